//! Logging: `tracing` with a filter that the admin endpoint can change at runtime.

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// Changes the active log filter (e.g. `info,ztunnel::proxy=debug`).
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("current", &self.current())
            .finish()
    }
}

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct LogFilterError {
    pub filter: String,
    pub reason: String,
}

impl LogHandle {
    pub fn current(&self) -> String {
        self.current.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), LogFilterError> {
        let err = |reason: String| LogFilterError {
            filter: filter.to_owned(),
            reason,
        };
        let f = EnvFilter::try_new(filter).map_err(|e| err(e.to_string()))?;
        self.handle.reload(f).map_err(|e| err(e.to_string()))?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_owned();
        }
        Ok(())
    }
}

/// Installs the global subscriber. `json` selects one JSON object per line.
/// Returns `None` if a subscriber was already installed (tests install several apps).
pub fn init(filter: &str, json: bool) -> Result<Option<LogHandle>, LogFilterError> {
    let f = EnvFilter::try_new(filter).map_err(|e| LogFilterError {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })?;
    let (layer, handle) = reload::Layer::new(f);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi);
    let res = if json {
        tracing_subscriber::registry()
            .with(layer)
            .with(fmt.json().flatten_event(true))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(layer)
            .with(fmt)
            .try_init()
    };
    Ok(res.ok().map(|()| LogHandle {
        handle,
        current: std::sync::Arc::new(std::sync::Mutex::new(filter.to_owned())),
    }))
}
