//! ztunnel: the mesh's per-node L4 proxy.
//!
//! Scope: TCP only. ztunnel captures pod traffic, carries it in HBONE tunnels (mutual TLS,
//! HTTP/2 CONNECT) with SPIFFE identities, and enforces L4 authorization. It never parses
//! the application's HTTP; that is the waypoint's job.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod app;
pub mod config;
pub mod controlplane;
pub mod dns;
pub mod identity;
pub mod inpod;
pub mod localconfig;
pub mod proxy;
pub mod state;
pub mod xds;
