//! The gRPC service: converts wire types at the edge and calls the engine.
//! The only place errors become `tonic::Status` is `From<ApiError>`.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Instant, SystemTime},
};

use chaos_proto::chaosd::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    convert,
    engine::{Engine, Event, EventKind, InjectSpec},
    error::ApiError,
    metrics::{self, Metrics},
    probe::{CgroupVersion, HostProbe, Probe},
    process::clients,
    wire,
};

/// Response metadata with a remark for the person who made the request
/// (e.g. which of chaosd's clients a fault left out); chaosctl prints it.
pub const NOTE_HEADER: &str = "chaosd-note";

/// State shared by all requests.
pub struct ChaosdService {
    started: Instant,
    probe: Arc<HostProbe>,
    engine: Arc<Engine>,
    state_dir: String,
    closing: CancellationToken,
    metrics: Option<Arc<Metrics>>,
}

impl ChaosdService {
    pub fn new(probe: Arc<HostProbe>, engine: Arc<Engine>, state_dir: String) -> Self {
        Self { started: Instant::now(), probe, engine, state_dir, closing: CancellationToken::new(), metrics: None }
    }

    /// Counts Inject requests in `metrics` (`--metrics-listen`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count_injection(&self, kind: &'static str, result: Result<std::time::Duration, tonic::Code>) {
        if let Some(m) = &self.metrics {
            m.injected(kind, result);
        }
    }

    /// Cancelled when the server starts shutting down: `Watch` streams end
    /// then, since the server waits for every open stream before it returns
    /// and the experiments (which end the streams) are recovered only after.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Runs engine work, which does syscalls and journal writes, without
    /// stalling the runtime: `block_in_place` hands this worker's other tasks
    /// to another thread and runs the work right here, sparing the two thread
    /// hand-offs of `spawn_blocking` on every request. A panic in the engine
    /// becomes an internal error for this request only.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> Result<T, ApiError> + Send + 'static,
    {
        let engine = self.engine.clone();
        tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&engine))))
            .map_err(|_| Status::internal("the request panicked in chaosd; see the daemon's log"))?
            .map_err(Status::from)
    }
}

fn probe_to_pb(p: &Probe) -> pb::Probe {
    pb::Probe { available: p.available, detail: p.detail.clone() }
}

pub fn status_to_pb(probe: &HostProbe) -> pb::HostCapabilities {
    let version = match probe.cgroup.version {
        CgroupVersion::V1 => pb::CgroupVersion::V1,
        CgroupVersion::V2 => pb::CgroupVersion::V2,
        CgroupVersion::Hybrid => pb::CgroupVersion::Hybrid,
        CgroupVersion::None => pb::CgroupVersion::Unspecified,
    };
    pb::HostCapabilities {
        kernel_release: probe.kernel_release.clone(),
        bpf_prog_load: Some(probe_to_pb(&probe.bpf_prog_load)),
        btf: Some(probe_to_pb(&probe.btf)),
        netem: Some(probe_to_pb(&probe.netem)),
        ifb: Some(probe_to_pb(&probe.ifb)),
        htb: Some(probe_to_pb(&probe.htb)),
        clsact: Some(probe_to_pb(&probe.clsact)),
        tcx: Some(probe_to_pb(&probe.tcx)),
        cgroup: Some(pb::CgroupInfo {
            version: version as i32,
            controllers: probe.cgroup.controllers.clone(),
            detail: probe.cgroup.detail.clone(),
        }),
        effective_capabilities: probe.effective_capabilities.clone(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ExperimentEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::chaosd_server::Chaosd for ChaosdService {
    async fn inject(&self, req: Request<pb::InjectRequest>) -> Result<Response<pb::Experiment>, Status> {
        let req = req.into_inner();
        let spec = (|| {
            let target = convert::target_from_pb(req.target)?;
            let fault = convert::fault_from_pb(req.fault, &target)?;
            let duration = convert::duration_from_pb(req.duration.as_ref())?;
            Ok::<_, ApiError>(InjectSpec { target, fault, duration, force: req.force })
        })();
        let spec = spec.map_err(|e| {
            let status = Status::from(e);
            self.count_injection("unknown", Err(status.code()));
            status
        })?;
        let kind = metrics::fault_kind(&spec.fault);
        let started = Instant::now();
        let exp = self.blocking(move |e| e.inject(spec)).await;
        self.count_injection(kind, exp.as_ref().map(|_| started.elapsed()).map_err(Status::code));
        let exp = exp?;
        let spared = clients::take_spared(&exp.id);
        let mut reply = Response::new(wire::experiment_to_pb(&exp, SystemTime::now()));
        if !spared.is_empty() {
            let who: Vec<String> = spared.iter().map(ToString::to_string).collect();
            let note =
                format!("left out {}: connected to chaosd, and chaosd never signals its own clients", who.join(", "));
            // Metadata is visible ASCII; a process name need not be.
            let note: String = note.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
            if let Ok(v) = note.parse() {
                reply.metadata_mut().insert(NOTE_HEADER, v);
            }
        }
        Ok(reply)
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let include_ended = req.into_inner().include_ended;
        let list = self.blocking(move |e| e.list(include_ended)).await?;
        let now = SystemTime::now();
        Ok(Response::new(pb::ListResponse {
            experiments: list.iter().map(|e| wire::experiment_to_pb(e, now)).collect(),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Experiment>, Status> {
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("no experiment id given".into()).into());
        }
        let exp = self.blocking(move |e| e.get(&id)).await?;
        Ok(Response::new(wire::experiment_to_pb(&exp, SystemTime::now())))
    }

    async fn recover(&self, req: Request<pb::RecoverRequest>) -> Result<Response<pb::RecoverResponse>, Status> {
        use pb::recover_request::Which;
        let recovered = match req.into_inner().which {
            Some(Which::Id(id)) if !id.is_empty() => vec![self.blocking(move |e| e.recover(&id)).await?],
            Some(Which::All(true)) => {
                self.blocking(|e| {
                    let (done, errors) = e.recover_all("recovered on request (all)");
                    match errors.into_iter().next() {
                        Some(err) => Err(err),
                        None => Ok(done),
                    }
                })
                .await?
            }
            _ => return Err(ApiError::InvalidArgument("give an experiment id or --all".into()).into()),
        };
        let now = SystemTime::now();
        Ok(Response::new(pb::RecoverResponse {
            recovered: recovered.iter().map(|e| wire::experiment_to_pb(e, now)).collect(),
        }))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let faults = self
            .probe
            .fault_availability()
            .into_iter()
            .map(|f| pb::FaultAvailability { fault: f.fault.into(), available: f.available, reason: f.reason })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            version: crate::VERSION.into(),
            uptime: Some(chaos_proto::duration_to_proto(self.started.elapsed())),
            capabilities: Some(status_to_pb(&self.probe)),
            faults,
            active_experiments: self.engine.active_count() as u32,
            pid: std::process::id(),
            state_dir: self.state_dir.clone(),
        }))
    }

    type WatchStream = EventStream;

    /// All events, or those of one experiment: its state now, then its
    /// changes until it ends. An unknown id is NotFound.
    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let only = req.into_inner().id;
        // Subscribed before the experiment is looked up, so that an end in
        // between is still seen.
        let rx = self.engine.subscribe();
        let (tx, out) = mpsc::channel(16);
        let only = if only.is_empty() {
            None
        } else {
            let id = only.clone();
            let now = self.blocking(move |e| e.get(&id)).await?;
            let ended = now.state.is_terminal();
            let first = Event { at: SystemTime::now(), kind: EventKind::StateChanged, experiment: now };
            let _ = tx.try_send(Ok(event_to_pb(&first)));
            if ended {
                return Ok(Response::new(Box::pin(ReceiverStream::new(out))));
            }
            Some(only)
        };
        tokio::spawn(follow(self.engine.clone(), only, rx, tx, self.closing.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

fn event_to_pb(ev: &Event) -> pb::ExperimentEvent {
    let kind = match ev.kind {
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::Counters => pb::EventKind::Counters,
    };
    pb::ExperimentEvent {
        at: Some(chaos_proto::timestamp_to_proto(ev.at)),
        kind: kind as i32,
        experiment: Some(wire::experiment_to_pb(&ev.experiment, ev.at)),
    }
}

/// Forwards events to a watcher: all of them, or one experiment's until it
/// ends (its final state is the last event). Stops when the watcher goes
/// away, and ends the stream with Unavailable when the daemon stops.
async fn follow(
    engine: Arc<Engine>,
    only: Option<String>,
    mut rx: broadcast::Receiver<Event>,
    tx: mpsc::Sender<Result<pb::ExperimentEvent, Status>>,
    closing: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = tx.closed() => return,
            _ = closing.cancelled() => {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "chaosd is shutting down (it recovers every active experiment before it stops)",
                    )))
                    .await;
                return;
            }
            ev = rx.recv() => ev,
        };
        let ev = match (ev, &only) {
            (Ok(ev), None) => ev,
            (Ok(ev), Some(id)) if ev.experiment.id == *id => ev,
            (Ok(_), Some(_)) => continue,
            // A slow watcher of everything just misses events.
            (Err(broadcast::error::RecvError::Lagged(_)), None) => continue,
            // The end of the one watched may have been among the dropped
            // events: ask the engine.
            (Err(broadcast::error::RecvError::Lagged(_)), Some(id)) => {
                let (engine, id) = (engine.clone(), id.clone());
                match tokio::task::spawn_blocking(move || engine.get(&id)).await {
                    Ok(Ok(exp)) if exp.state.is_terminal() => {
                        Event { at: SystemTime::now(), kind: EventKind::StateChanged, experiment: exp }
                    }
                    _ => continue,
                }
            }
            (Err(broadcast::error::RecvError::Closed), _) => return,
        };
        let end = only.is_some() && ev.kind == EventKind::StateChanged && ev.experiment.state.is_terminal();
        if tx.send(Ok(event_to_pb(&ev))).await.is_err() || end {
            return;
        }
    }
}
