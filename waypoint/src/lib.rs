//! The waypoint: terminates HBONE on 15008, serves the HTTP inside each tunnel through a fixed
//! list of request phases (authenticate → authorize → route → upstream → respond → log), and
//! carries each request on to the chosen endpoint over HBONE.
