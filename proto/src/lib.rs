//! Wire types of chaosd's gRPC API (`chaosd.v1`) and of the broker cluster
//! (`broker.v1`). These are transport types: the daemon converts them into its
//! own types at the edge and never stores them. Each API sits behind a cargo
//! feature of its name (`chaosd`, `broker`).

#[cfg(feature = "chaosd")]
pub mod chaosd {
    pub mod v1 {
        tonic::include_proto!("chaosd.v1");
    }
}

#[cfg(feature = "broker")]
pub mod broker {
    pub mod v1 {
        tonic::include_proto!("broker.v1");
    }
}

#[cfg(feature = "chaosd")]
pub use prost_types::{Duration, Timestamp};

#[cfg(feature = "chaosd")]
/// Converts a std duration to its wire form.
pub fn duration_to_proto(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

#[cfg(feature = "chaosd")]
/// Converts a wire duration to std; `None` when it is negative or out of range.
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<std::time::Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(feature = "chaosd")]
/// Converts a wall-clock time to its wire form.
pub fn timestamp_to_proto(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

#[cfg(all(test, feature = "chaosd"))]
mod tests {
    use super::*;

    #[test]
    fn duration_round_trip_and_rejects_negative() {
        let d = std::time::Duration::from_millis(1500);
        assert_eq!(duration_from_proto(&duration_to_proto(d)), Some(d));
        assert_eq!(duration_from_proto(&prost_types::Duration { seconds: -1, nanos: 0 }), None);
    }
}
