//! The OTLP/gRPC exporter: finished requests in through a bounded queue, batches out to
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export`, off the request path.
//!
//! ```text
//! request task ──try_send──► [queue: TRACING_QUEUE_SIZE] ──► exporter task ──Export──► collector
//!   full? drop + count                                  every TRACING_BATCH_INTERVAL
//!                                                       or TRACING_BATCH_SIZE spans
//! ```
//!
//! Invariants: a request never waits on tracing (a full queue drops the span and counts it
//! in `waypoint_trace_spans_dropped_total{reason="queue_full"}`); a batch the collector does
//! not take is retried with backoff (3 tries: 0.1 s, 0.2 s apart), then dropped and counted
//! (`reason="export_failed"`), with one warning until the collector answers again; on
//! shutdown the exporter closes the queue and sends what it holds, once, within a deadline.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, warn};

use super::{
    Identity,
    proto::{
        collector::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
        common::InstrumentationScope,
        trace::{ResourceSpans, ScopeSpans},
    },
    to_span,
};
use crate::{config::TracingConfig, metrics::Record};

/// How long one Export call may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per batch while the collector is failing.
const TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("TRACING_OTLP_ENDPOINT {0:?}: {1}")]
    Endpoint(String, String),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// The exporter's counters (also on `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl Stats {
    pub fn exported(&self) -> u64 {
        self.exported.get()
    }
    /// Spans dropped for `reason`: `queue_full`, `export_failed`, `rejected` (by the
    /// collector) or `shutdown`.
    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }
    fn drop_n(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }
}

/// The request path's end of the queue.
#[derive(Debug, Clone)]
pub struct Sink {
    tx: mpsc::Sender<Box<Record>>,
    stats: Stats,
}

impl Sink {
    /// Queues a finished request without waiting; a full queue drops it (counted).
    pub fn send(&self, rec: Box<Record>) {
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.stats.drop_n("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.stats.drop_n("shutdown", 1),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// A running exporter.
#[derive(Debug)]
pub struct Exporter {
    sink: Sink,
    stop: std::sync::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

impl Exporter {
    /// Registers the counters and starts the exporter task on the current runtime; the
    /// channel dials the collector on the first export.
    pub fn start(
        cfg: &TracingConfig,
        id: Identity,
        registry: &mut Registry,
    ) -> Result<Exporter, ExportError> {
        let channel = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| ExportError::Endpoint(cfg.endpoint.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let stats = Stats::default();
        registry.register(
            "waypoint_trace_spans_exported",
            "Trace spans the OTLP collector accepted",
            stats.exported.clone(),
        );
        registry.register(
            "waypoint_trace_spans_dropped",
            "Trace spans dropped, by reason (queue_full, export_failed, rejected, shutdown)",
            stats.dropped.clone(),
        );
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = Task {
            client: TraceServiceClient::new(channel),
            id,
            endpoint: cfg.endpoint.clone(),
            batch_size: cfg.batch_size,
            interval: cfg.batch_interval,
            stats: stats.clone(),
            failing: false,
        };
        tokio::spawn(
            task.run(rx, stop_rx)
                .instrument(tracing::info_span!("otlp", endpoint = %cfg.endpoint)),
        );
        info!(endpoint = %cfg.endpoint, sampling = cfg.sampling_percent, "exporting trace spans over OTLP/gRPC");
        Ok(Exporter {
            sink: Sink { tx, stats },
            stop: std::sync::Mutex::new(Some(stop_tx)),
        })
    }

    pub fn sink(&self) -> Sink {
        self.sink.clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.sink.stats
    }

    /// Closes the queue and sends what is queued, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(stop) = stop else { return };
        let (done_tx, done_rx) = oneshot::channel();
        if stop.send(done_tx).is_ok() && tokio::time::timeout(within, done_rx).await.is_err() {
            warn!(?within, "trace spans not flushed before the deadline");
        }
    }
}

struct Task {
    client: TraceServiceClient<Channel>,
    id: Identity,
    endpoint: String,
    batch_size: usize,
    interval: Duration,
    stats: Stats,
    /// The last batch failed (the warning has been logged).
    failing: bool,
}

// Records stay boxed from the queue to the batch: a queue slot is a pointer, not a record.
#[allow(clippy::vec_box)]
impl Task {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Box<Record>>,
        mut stop: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf: Vec<Box<Record>> = Vec::with_capacity(self.batch_size);
        loop {
            let room = self.batch_size - buf.len();
            tokio::select! {
                done = &mut stop => {
                    rx.close();
                    while let Some(r) = rx.recv().await {
                        buf.push(r);
                    }
                    while !buf.is_empty() {
                        let n = buf.len().min(self.batch_size);
                        let batch: Vec<_> = buf.drain(..n).collect();
                        self.flush(batch, 1).await;
                    }
                    debug!(exported = self.stats.exported(), "exporter stopped");
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                n = rx.recv_many(&mut buf, room) => {
                    if n == 0 {
                        // Every sender is gone: the proxy went away without a shutdown.
                        let batch = std::mem::take(&mut buf);
                        self.flush(batch, 1).await;
                        return;
                    }
                    if buf.len() < self.batch_size {
                        continue;
                    }
                }
                _ = tick.tick() => {
                    if buf.is_empty() {
                        continue;
                    }
                }
            }
            let batch = std::mem::replace(&mut buf, Vec::with_capacity(self.batch_size));
            self.flush(batch, TRIES).await;
        }
    }

    fn request(&self, batch: &[Box<Record>]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.id.resource()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch.iter().filter_map(|r| to_span(r, &self.id)).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    async fn flush(&mut self, batch: Vec<Box<Record>>, tries: u32) {
        if batch.is_empty() {
            return;
        }
        let req = self.request(&batch);
        drop(batch);
        let n = req.resource_spans[0].scope_spans[0].spans.len() as u64;
        let mut backoff = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=tries {
            match self.client.export(req.clone()).await {
                Ok(resp) => {
                    let rejected = resp
                        .into_inner()
                        .partial_success
                        .map(|p| p.rejected_spans.clamp(0, n as i64) as u64)
                        .unwrap_or(0);
                    self.stats.exported.inc_by(n - rejected);
                    if rejected > 0 {
                        self.stats.drop_n("rejected", rejected);
                        debug!(rejected, "the collector refused some spans");
                    }
                    if self.failing {
                        info!(endpoint = %self.endpoint, "OTLP collector answering again");
                        self.failing = false;
                    }
                    return;
                }
                Err(status) => {
                    last = format!("{}: {}", status.code(), status.message());
                    let retriable = matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::ResourceExhausted
                            | tonic::Code::Aborted
                            | tonic::Code::Cancelled
                            | tonic::Code::Unknown
                    );
                    if !retriable || attempt == tries {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        self.stats.drop_n("export_failed", n);
        if self.failing {
            debug!(error = %last, dropped = n, "OTLP export failed");
        } else {
            warn!(
                endpoint = %self.endpoint,
                error = %last,
                dropped = n,
                "OTLP export failed; dropping spans until the collector answers (is TRACING_OTLP_ENDPOINT an OTLP/gRPC port, usually 4317?)"
            );
            self.failing = true;
        }
    }
}

/// Starts the exporter for `cfg` if tracing is on; `None` when it is off.
pub fn start(
    cfg: Option<&TracingConfig>,
    id: Identity,
    registry: &mut Registry,
) -> Result<Option<Arc<Exporter>>, ExportError> {
    cfg.map(|c| Exporter::start(c, id, registry).map(Arc::new))
        .transpose()
}
