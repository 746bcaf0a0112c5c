//! Running the coordinator as a server: one sled store in the data directory, the engine
//! with leases that expire, the worker and control services over tonic (TLS with rustls
//! when given a certificate), resumption of unfinished runs, graceful shutdown.

use super::{ControlApi, MeshConfig, worker_service};
use crate::scheduler::EngineConfig;
use crate::{Coordinator, Result, Store};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The worker-facing settings (data dir, enrolment token, heartbeats, limits).
    pub mesh: MeshConfig,
    /// The token operators present.
    pub operator_token: String,
    /// How long a job no worker can run waits for one before it fails.
    pub unfit_grace: Duration,
    /// Validation for steps that ask for none (`--validate`).
    pub default_validation: Option<nexa_shared::spec::Validation>,
    /// PEM certificate chain and key for TLS; plain HTTP/2 when absent.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Start pilot workers in Slurm allocations for `scheduler: slurm` steps.
    pub slurm: Option<crate::slurm::SlurmConfig>,
}

/// Serves on `listener` until `shutdown` resolves, then stops taking calls, stops the
/// engine and flushes the store.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with_metrics(listener, None, cfg, shutdown).await
}

/// [`serve`], with `/metrics`, `/healthz` and `/readyz` on `metrics` when given.
pub async fn serve_with_metrics(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let store = open_store(&cfg.mesh.data_dir)?;
    serve_opened(listener, metrics, cfg, store, shutdown).await
}

/// Opens (or makes) the data directory's store, checked to be the one made there (see
/// [`crate::recover::open_checked`]); an error says how to rebuild it.
pub fn open_store(data_dir: &std::path::Path) -> Result<Arc<crate::SledStore>> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| crate::Error::Domain(nexa_shared::Error::io("create", data_dir, e)))?;
    let store = crate::recover::open_checked(data_dir).map_err(|e| match e {
        crate::Error::Store(m) => crate::Error::Store(format!(
            "{m}\n  if it cannot be opened again, `nexa-coordinator store recover --data-dir {}` rebuilds it from the sealed artifacts and the state and registry mirrors (the old store is moved aside)",
            data_dir.display()
        )),
        other => other,
    })?;
    Ok(Arc::new(store))
}

/// [`serve_with_metrics`] on a store already opened with [`open_store`] (so that a
/// caller can refuse to start before it says it listens).
pub async fn serve_opened(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    cfg: ServeConfig,
    sled: Arc<crate::SledStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    // Uploads of a previous process belong to leases that died with it (generations
    // start anew): nothing in them can be sealed, so they go.
    let staging = cfg.mesh.data_dir.join("staging");
    if staging.exists()
        && let Err(e) = std::fs::remove_dir_all(&staging)
    {
        tracing::warn!(error = %e, dir = %staging.display(), "removing stale uploads");
    }
    let store: Arc<dyn Store> = sled.clone();
    let exported = Arc::new(
        crate::metrics::Metrics::new()
            .map_err(|e| crate::Error::Server(format!("metrics: {e}")))?,
    );
    let mut cfg = cfg;
    cfg.mesh.metrics = Some(exported.clone());
    let disk = Arc::new(crate::disk::DiskGuard::new(
        cfg.mesh.data_dir.clone(),
        cfg.mesh.min_free,
    ));
    let disk_watch = disk.clone().watch(Duration::from_secs(1));
    cfg.mesh.disk = Some(disk.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    cfg.mesh.stopping = Some(stop_rx);
    let shutdown = async move {
        shutdown.await;
        // Long-polling leases and watch streams end now instead of holding the stop.
        let _ = stop_tx.send(true);
    };
    let (coord, engine) = Coordinator::start(
        store.clone(),
        EngineConfig {
            lease_ttl: Some(cfg.mesh.lease_ttl),
            unfit_grace: cfg.unfit_grace,
            throttle_failing_workers: true,
            registry: Some(store.clone()),
            registry_mirror: Some(cfg.mesh.data_dir.join(crate::recover::REGISTRY_MIRROR)),
            default_validation: cfg.default_validation,
            metrics: Some(exported.clone()),
            progress_lines: crate::scheduler::PROGRESS,
            provided_schedulers: cfg
                .slurm
                .iter()
                .map(|_| crate::slurm::provider::SCHEDULER.to_string())
                .collect(),
            resident_workers: Vec::new(),
            shard_window: crate::scheduler::SHARD_WINDOW,
        },
    );
    let operator_token = cfg.operator_token.clone();
    let control = ControlApi::new(
        coord.clone(),
        store,
        cfg.mesh.clone(),
        cfg.operator_token.clone(),
    );
    // Before resumed runs queue jobs: the provider first finds the pilots a previous
    // process left.
    let provider = cfg
        .slurm
        .clone()
        .map(|s| crate::slurm::Provider::spawn(coord.clone(), s));
    let resumed = control.resume_unfinished().await;
    if resumed > 0 {
        tracing::info!(runs = resumed, "resumed unfinished runs");
    }
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(l) = metrics {
        let size = Arc::new(move || sled.size_on_disk());
        let http = super::http::serve_http(l, coord.clone(), exported, size, disk, async {
            let _ = http_stopped.await;
        });
        coord.tasks().spawn("metrics endpoint", async move {
            if let Err(e) = http.await {
                tracing::error!(error = %e, "metrics endpoint");
            }
        });
    }
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    if let Some((cert, key)) = &cfg.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| crate::Error::Server(format!("tls: {e}")))?;
    }
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, tls = cfg.tls.is_some(), "coordinator serving");
    let result = builder
        .add_service(worker_service(coord.clone(), cfg.mesh.clone()))
        // The token is checked on the headers first; only then may a large body be read,
        // and only a few at a time.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            super::large_requests::LargeRequestLimit::new(
                nexa_proto::v1::control_service_server::ControlServiceServer::new(control)
                    .max_decoding_message_size(cfg.mesh.max_submit_bytes),
            ),
            move |req: tonic::Request<()>| {
                super::auth::check_operator_token(req.metadata(), &operator_token).map(|()| req)
            },
        ))
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on every accepted connection: the builder's tcp_nodelay
            // applies only to listeners tonic binds itself, and without it a streamed
            // response's second small frame waits ~40 ms for the peer's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    let _ = stop_http.send(());
    disk_watch.abort();
    if let Some(p) = provider {
        p.stop().await;
    }
    coord.shutdown();
    let _ = engine.await;
    result.map_err(|e| crate::Error::Server(e.to_string()))
}
