//! Leader election among istiod-lite replicas, on the `coordination.k8s.io/v1` Lease
//! `istiod-lite-leader` (client-go's algorithm, as istiod's own election uses it):
//! - every replica tries to acquire or renew every `lease / 6`; updates carry the Lease's
//!   `resourceVersion`, so two replicas can never both win one round (the loser gets 409);
//! - a Lease held by another replica is taken over only once it has not changed for
//!   `lease` as seen by *this* replica's clock (the time the record was last observed to
//!   change), so clock skew between nodes does not matter;
//! - a leader that cannot renew for `lease / 2` steps down before anyone can take over;
//! - on drain the leader releases the Lease (empty holder), so a rolling update hands over at
//!   once instead of after a lease.
//!
//! [`spawn_gated`] runs a set of tasks only while this replica leads: each term gets its own
//! [`DrainWatcher`], drained when the term ends. The waypoint deployer and the status writers
//! run under it; xDS and the CA serve on every replica.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use mesh_rt::drain::{self, DrainWatcher};
use tokio::{sync::watch, time::Instant};
use tracing::{Instrument, info, info_span, warn};

use crate::config::LeaderConfig;

/// The Lease's name, in [`LeaderConfig::namespace`].
pub const LEASE_NAME: &str = "istiod-lite-leader";

/// How long a term's tasks get to finish once the term ends.
const TERM_DRAIN: Duration = Duration::from_secs(10);

/// One replica's view of the Lease between rounds.
struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// The record's resourceVersion when last seen, and when it was first seen so.
    observed: Option<(String, Instant)>,
}

/// The outcome of one round.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Leading,
    Following { holder: String },
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn lease_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl Elector {
    fn new(client: Client, cfg: LeaderConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
    }

    async fn round(&mut self) -> Result<Round, kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_owned()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(lease_seconds(self.cfg.lease_duration)),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Leading),
                // Another replica created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Following {
                    holder: "(another replica, just now)".to_owned(),
                }),
                Err(e) => Err(e),
            };
        };
        let rv = lease.resource_version().unwrap_or_default();
        let now = Instant::now();
        let seen_since = match &self.observed {
            Some((r, at)) if *r == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_for = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        let mine = holder == self.cfg.identity;
        let expired = holder.is_empty() || now.duration_since(seen_since) > held_for;
        if !mine && !expired {
            return Ok(Round::Following { holder });
        }
        if !mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.acquire_time = Some(micro_now());
        }
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(lease_seconds(self.cfg.lease_duration));
        spec.renew_time = Some(micro_now());
        lease.spec = Some(spec);
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.observed = Some((l.resource_version().unwrap_or_default(), Instant::now()));
                Ok(Round::Leading)
            }
            // Someone else wrote it since we read it: they won this round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Following { holder }),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica still holds it.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = LEASE_NAME, "released the leader lease"),
            Err(e) => {
                warn!(lease = LEASE_NAME, error = %e, "could not release the leader lease; another replica takes over when it expires")
            }
        }
    }
}

/// Starts the election; the receiver is `true` while this replica leads. Returns at once.
pub fn spawn(client: Client, cfg: LeaderConfig, drain: DrainWatcher) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let span = info_span!("leader", lease = LEASE_NAME, identity = %cfg.identity);
    tokio::spawn(run(Elector::new(client, cfg), tx, drain).instrument(span));
    rx
}

async fn run(mut el: Elector, tx: watch::Sender<bool>, drain: DrainWatcher) {
    let retry = el.cfg.lease_duration / 6;
    let renew_deadline = el.cfg.lease_duration / 2;
    let mut last_renewal: Option<Instant> = None;
    let mut following: Option<String> = None;
    loop {
        match el.round().await {
            Ok(Round::Leading) => {
                if !*tx.borrow() {
                    info!(namespace = %el.cfg.namespace, "became the leader: deploying waypoints and writing status");
                    tx.send_replace(true);
                }
                last_renewal = Some(Instant::now());
                following = None;
            }
            Ok(Round::Following { holder }) => {
                if *tx.borrow() {
                    warn!(%holder, "lost the leader lease to another replica; stopping waypoint deployment and status writes");
                    tx.send_replace(false);
                }
                if following.as_deref() != Some(holder.as_str()) {
                    info!(%holder, "following: another replica leads");
                    following = Some(holder);
                }
            }
            Err(e) => {
                warn!(error = %e, "leader election round failed (check that istiod-lite may get, create and update leases in its namespace)");
                if *tx.borrow() && last_renewal.is_none_or(|t| t.elapsed() > renew_deadline) {
                    warn!(
                        renew_deadline_s = renew_deadline.as_secs(),
                        "could not renew the leader lease in time; stepping down"
                    );
                    tx.send_replace(false);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = drain.signaled() => {
                if *tx.borrow() {
                    tx.send_replace(false);
                    el.release().await;
                }
                return;
            }
        }
    }
}

/// Runs `start` at the beginning of each term this replica leads, with a watcher that is
/// drained when the term ends (or the process drains). `leading = None` (no election):
/// one term that lasts until the process drains.
pub fn spawn_gated<F>(leading: Option<watch::Receiver<bool>>, drain: DrainWatcher, start: F)
where
    F: Fn(DrainWatcher) + Send + 'static,
{
    let Some(mut leading) = leading else {
        start(drain);
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = leading.wait_for(|l| *l) => if r.is_err() { return },
                () = drain.signaled() => return,
            }
            let (term, watcher) = drain::new();
            start(watcher);
            tokio::select! {
                _ = leading.wait_for(|l| !*l) => {}
                () = drain.signaled() => {}
            }
            let _ = term.drain(TERM_DRAIN).await;
            if drain.is_draining() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_an_election_the_one_term_starts_at_once() {
        let (trigger, watcher) = drain::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn_gated(None, watcher, move |_| {
            let _ = tx.send(());
        });
        assert!(rx.recv().await.is_some());
        drop(trigger);
    }

    #[tokio::test]
    async fn a_term_starts_when_leading_and_is_drained_when_not() {
        let (_trigger, watcher) = drain::new();
        let (lead_tx, lead_rx) = watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DrainWatcher>();
        spawn_gated(Some(lead_rx), watcher, move |w| {
            let _ = tx.send(w);
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "no term before leading");
        lead_tx.send_replace(true);
        let term = rx.recv().await.unwrap();
        assert!(!term.is_draining());
        lead_tx.send_replace(false);
        tokio::time::timeout(Duration::from_secs(1), term.signaled())
            .await
            .expect("the term is drained when leadership ends");
        drop(term);
        lead_tx.send_replace(true);
        let second = rx.recv().await.unwrap();
        assert!(!second.is_draining(), "a new term, a new watcher");
    }
}
