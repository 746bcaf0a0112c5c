//! Worker states between the wire and [`nexa_shared::record`].

use super::{ConvertError, err};
use crate::v1;
use nexa_shared::record::{AdminState, WorkerState};

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
}
