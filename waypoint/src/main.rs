//! `waypoint` binary: parses the Config and runs the proxy until SIGTERM, then drains.

fn main() {}
