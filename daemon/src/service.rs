//! The gRPC service: converts wire types at the edge and calls the engine.
//! The only place errors become `tonic::Status` is `From<ApiError>`.

use std::{pin::Pin, sync::Arc, time::Instant};

use chaos_proto::chaosd::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::probe::{CgroupVersion, HostProbe, Probe};

/// State shared by all requests.
pub struct ChaosdService {
    started: Instant,
    probe: Arc<HostProbe>,
    state_dir: String,
}

impl ChaosdService {
    pub fn new(probe: Arc<HostProbe>, state_dir: String) -> Self {
        Self { started: Instant::now(), probe, state_dir }
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
    async fn inject(&self, _req: Request<pb::InjectRequest>) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::unimplemented("inject is not implemented in this build"))
    }

    async fn list(&self, _req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(pb::ListResponse::default()))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::not_found(format!("no experiment with id '{}'", req.into_inner().id)))
    }

    async fn recover(&self, _req: Request<pb::RecoverRequest>) -> Result<Response<pb::RecoverResponse>, Status> {
        Err(Status::unimplemented("recover is not implemented in this build"))
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
            active_experiments: 0,
            pid: std::process::id(),
            state_dir: self.state_dir.clone(),
        }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, _req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch is not implemented in this build"))
    }
}
