//! Every message the coordinator decodes from a worker or an operator (and the CLI from
//! a coordinator), and the conversions to domain types: any bytes decode or fail, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexa_proto::v1;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 17 {
        0 => {
            if let Ok(m) = v1::JobResult::decode(bytes) {
                let _ = nexa_shared::job::JobResult::try_from(m);
            }
        }
        1 => {
            let _ = v1::UploadChunk::decode(bytes);
        }
        2 => {
            if let Ok(m) = v1::EnrolRequest::decode(bytes) {
                let _ = nexa_shared::hardware::Profile::from(m.profile.unwrap_or_default());
            }
        }
        3 => {
            let _ = v1::ChallengeRequest::decode(bytes);
        }
        4 => {
            if let Ok(m) = v1::HeartbeatRequest::decode(bytes) {
                let _ = m.profile.map(nexa_shared::hardware::Profile::from);
            }
        }
        5 => {
            let _ = v1::LeaseRequest::decode(bytes);
        }
        6 => {
            let _ = v1::FetchRequest::decode(bytes);
        }
        7 => {
            let _ = v1::SubmitRequest::decode(bytes);
        }
        8 => {
            let _ = v1::BlobChunk::decode(bytes);
        }
        9 => {
            if let Ok(m) = v1::Lease::decode(bytes) {
                let _ = nexa_proto::convert::lease_from_wire(m, Vec::new());
            }
        }
        10 => {
            let _ = v1::WatchRequest::decode(bytes);
        }
        // What the CLI reads back from a coordinator: run events and step records.
        11 => {
            if let Ok(m) = v1::RunEvent::decode(bytes) {
                let _ = nexa_shared::record::Progress::try_from(m);
            }
        }
        12 => {
            if let Ok(m) = v1::StatusResponse::decode(bytes) {
                for s in m.steps {
                    let _ = nexa_shared::record::StepRecord::try_from(s);
                }
            }
        }
        // The operator's views: workers, the registry's answers, lineage graphs.
        13 => {
            if let Ok(m) = v1::ListWorkersResponse::decode(bytes) {
                for w in m.workers {
                    let _ = nexa_shared::record::WorkerSummary::try_from(w);
                }
            }
        }
        14 => {
            if let Ok(m) = v1::ModelsResponse::decode(bytes) {
                let _ = nexa_shared::models::RegistryAnswer::try_from(m);
            }
        }
        15 => {
            if let Ok(m) = v1::LineageResponse::decode(bytes) {
                let _ = m.graph.map(nexa_shared::lineage::Graph::try_from);
            }
        }
        _ => {
            let _ = v1::PullRequest::decode(bytes);
        }
    }
});
