//! Worker states between the wire and [`nexa_shared::record`].

use super::{ConvertError, err};
use crate::v1;
use nexa_shared::record::{AdminState, WorkerState, WorkerSummary};

impl From<AdminState> for v1::WorkerAdminState {
    fn from(s: AdminState) -> Self {
        match s {
            AdminState::Active => v1::WorkerAdminState::Active,
            AdminState::Drain => v1::WorkerAdminState::Drain,
            AdminState::Ban => v1::WorkerAdminState::Ban,
        }
    }
}

/// The admin state of a `SetWorkerStateRequest`.
pub fn admin_state_from_wire(v: i32) -> Result<AdminState, ConvertError> {
    match v1::WorkerAdminState::try_from(v) {
        Ok(v1::WorkerAdminState::Active) => Ok(AdminState::Active),
        Ok(v1::WorkerAdminState::Drain) => Ok(AdminState::Drain),
        Ok(v1::WorkerAdminState::Ban) => Ok(AdminState::Ban),
        Ok(v1::WorkerAdminState::Unspecified) | Err(_) => Err(err(
            "SetWorkerStateRequest",
            "state",
            format!("{v} is not active, drain or ban"),
        )),
    }
}

impl From<WorkerState> for v1::WorkerState {
    fn from(s: WorkerState) -> Self {
        match s {
            WorkerState::Active => v1::WorkerState::Active,
            WorkerState::Lost => v1::WorkerState::Lost,
            WorkerState::Draining => v1::WorkerState::Draining,
            WorkerState::Banned => v1::WorkerState::Banned,
            WorkerState::Throttled => v1::WorkerState::Throttled,
            WorkerState::Quarantined => v1::WorkerState::Quarantined,
        }
    }
}

/// The state of a `WorkerStatus`.
pub fn worker_state_from_wire(v: i32) -> Result<WorkerState, ConvertError> {
    Ok(match v1::WorkerState::try_from(v) {
        Ok(v1::WorkerState::Active) => WorkerState::Active,
        Ok(v1::WorkerState::Lost) => WorkerState::Lost,
        Ok(v1::WorkerState::Draining) => WorkerState::Draining,
        Ok(v1::WorkerState::Banned) => WorkerState::Banned,
        Ok(v1::WorkerState::Throttled) => WorkerState::Throttled,
        Ok(v1::WorkerState::Quarantined) => WorkerState::Quarantined,
        Ok(v1::WorkerState::Unspecified) | Err(_) => {
            return Err(err(
                "WorkerStatus",
                "state",
                format!("{v} is not a known worker state"),
            ));
        }
    })
}

impl From<&WorkerSummary> for v1::WorkerStatus {
    fn from(w: &WorkerSummary) -> Self {
        v1::WorkerStatus {
            worker_id: w.id.to_string(),
            name: w.name.clone(),
            state: v1::WorkerState::from(w.state) as i32,
            profile: Some(v1::HardwareProfile::from(&w.profile)),
            slots: w.slots,
            running: w.running,
            succeeded: w.succeeded,
            failed: w.failed,
            public_key: w.key.to_vec(),
            valid: w.valid,
            invalid: w.invalid,
            trusted_for: w.trusted_for.clone(),
            cpu_seconds: w.cpu_seconds,
            gpu_seconds: w.gpu_seconds,
        }
    }
}

impl TryFrom<v1::WorkerStatus> for WorkerSummary {
    type Error = ConvertError;
    fn try_from(w: v1::WorkerStatus) -> Result<Self, ConvertError> {
        let key: [u8; 32] = w.public_key.as_slice().try_into().map_err(|_| {
            err(
                "WorkerStatus",
                "public_key",
                format!("{} bytes, not 32", w.public_key.len()),
            )
        })?;
        Ok(WorkerSummary {
            id: w.worker_id.into(),
            name: w.name,
            state: worker_state_from_wire(w.state)?,
            profile: w.profile.map(Into::into).unwrap_or_default(),
            slots: w.slots,
            running: w.running,
            succeeded: w.succeeded,
            failed: w.failed,
            key,
            valid: w.valid,
            invalid: w.invalid,
            trusted_for: w.trusted_for,
            cpu_seconds: w.cpu_seconds,
            gpu_seconds: w.gpu_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_ones_are_refused() {
        for s in WorkerState::ALL {
            let wire = v1::WorkerState::from(s) as i32;
            assert_eq!(worker_state_from_wire(wire), Ok(s));
        }
        for a in [AdminState::Active, AdminState::Drain, AdminState::Ban] {
            let wire = v1::WorkerAdminState::from(a) as i32;
            assert_eq!(admin_state_from_wire(wire), Ok(a));
        }
        assert_eq!(
            worker_state_from_wire(0).expect_err("unspecified").field,
            "state"
        );
        assert!(admin_state_from_wire(42).is_err());
    }

    #[test]
    fn a_worker_summary_survives_the_wire_and_a_bad_key_is_refused() {
        let w = WorkerSummary {
            id: "w-1".into(),
            name: "box".into(),
            state: WorkerState::Throttled,
            profile: nexa_shared::hardware::Profile {
                hostname: "h".into(),
                cores: 8,
                ..Default::default()
            },
            slots: 2,
            running: 1,
            succeeded: 10,
            failed: 3,
            key: [7; 32],
            valid: 4,
            invalid: 1,
            trusted_for: vec!["exec".into()],
            cpu_seconds: 12.5,
            gpu_seconds: 3.0,
        };
        let mut wire = v1::WorkerStatus::from(&w);
        assert_eq!(WorkerSummary::try_from(wire.clone()).expect("converts"), w);
        wire.public_key.pop();
        let e = WorkerSummary::try_from(wire).unwrap_err();
        assert_eq!((e.message, e.field), ("WorkerStatus", "public_key"));
    }
}
