//! JWT validation for Istio's RequestAuthentication, as the waypoint applies it.
