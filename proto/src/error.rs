//! Typed errors for everything that can be wrong with bytes from a peer, and
//! the reject codes that carry them back over the wire.

use crate::wire;

/// Why the aggregator refused something. Mirrors `fedge.v1.RejectCode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCode {
    SchemaMismatch,
    Malformed,
    TooLarge,
    AuthFailed,
    BadSignature,
    Replay,
    UnknownRound,
    RoundClosed,
    UnknownModelVersion,
    DeadlinePassed,
    NotSelected,
    DimensionMismatch,
    NonFinite,
    HashMismatch,
    RateLimited,
    TooManyDevices,
    ProtocolViolation,
    NormBound,
    Internal,
    /// The manifest was signed for another federation.
    WrongFederation,
    /// A partial aggregate claims more weight than its devices can carry.
    WeightBound,
}

impl RejectCode {
    pub const ALL: [RejectCode; 21] = [
        RejectCode::SchemaMismatch,
        RejectCode::Malformed,
        RejectCode::TooLarge,
        RejectCode::AuthFailed,
        RejectCode::BadSignature,
        RejectCode::Replay,
        RejectCode::UnknownRound,
        RejectCode::RoundClosed,
        RejectCode::UnknownModelVersion,
        RejectCode::DeadlinePassed,
        RejectCode::NotSelected,
        RejectCode::DimensionMismatch,
        RejectCode::NonFinite,
        RejectCode::HashMismatch,
        RejectCode::RateLimited,
        RejectCode::TooManyDevices,
        RejectCode::ProtocolViolation,
        RejectCode::NormBound,
        RejectCode::Internal,
        RejectCode::WrongFederation,
        RejectCode::WeightBound,
    ];

    pub fn to_wire(self) -> wire::RejectCode {
        use wire::RejectCode as W;
        match self {
            RejectCode::SchemaMismatch => W::RejectSchemaMismatch,
            RejectCode::Malformed => W::RejectMalformed,
            RejectCode::TooLarge => W::RejectTooLarge,
            RejectCode::AuthFailed => W::RejectAuthFailed,
            RejectCode::BadSignature => W::RejectBadSignature,
            RejectCode::Replay => W::RejectReplay,
            RejectCode::UnknownRound => W::RejectUnknownRound,
            RejectCode::RoundClosed => W::RejectRoundClosed,
            RejectCode::UnknownModelVersion => W::RejectUnknownModelVersion,
            RejectCode::DeadlinePassed => W::RejectDeadlinePassed,
            RejectCode::NotSelected => W::RejectNotSelected,
            RejectCode::DimensionMismatch => W::RejectDimensionMismatch,
            RejectCode::NonFinite => W::RejectNonFinite,
            RejectCode::HashMismatch => W::RejectHashMismatch,
            RejectCode::RateLimited => W::RejectRateLimited,
            RejectCode::TooManyDevices => W::RejectTooManyDevices,
            RejectCode::ProtocolViolation => W::RejectProtocolViolation,
            RejectCode::NormBound => W::RejectNormBound,
            RejectCode::Internal => W::RejectInternal,
            RejectCode::WrongFederation => W::RejectWrongFederation,
            RejectCode::WeightBound => W::RejectWeightBound,
        }
    }

    pub fn from_wire(code: i32) -> Result<Self, ProtoError> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.to_wire() as i32 == code)
            .ok_or(ProtoError::UnknownEnum {
                field: "reject.code",
                value: code,
            })
    }

    /// Stable snake_case name, used in logs, metrics and contribution records.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::SchemaMismatch => "schema_mismatch",
            RejectCode::Malformed => "malformed",
            RejectCode::TooLarge => "too_large",
            RejectCode::AuthFailed => "auth_failed",
            RejectCode::BadSignature => "bad_signature",
            RejectCode::Replay => "replay",
            RejectCode::UnknownRound => "unknown_round",
            RejectCode::RoundClosed => "round_closed",
            RejectCode::UnknownModelVersion => "unknown_model_version",
            RejectCode::DeadlinePassed => "deadline_passed",
            RejectCode::NotSelected => "not_selected",
            RejectCode::DimensionMismatch => "dimension_mismatch",
            RejectCode::NonFinite => "non_finite",
            RejectCode::HashMismatch => "hash_mismatch",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::TooManyDevices => "too_many_devices",
            RejectCode::ProtocolViolation => "protocol_violation",
            RejectCode::NormBound => "norm_bound",
            RejectCode::Internal => "internal",
            RejectCode::WrongFederation => "wrong_federation",
            RejectCode::WeightBound => "weight_bound",
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` must be {expected} bytes, got {got}")]
    BadLength {
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("field `{field}` has unknown enum value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("{what} is {value}, over the limit of {max}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("message `{0}` is not valid in this direction")]
    WrongDirection(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimensionMismatch { expected: u64, got: u64 },
    #[error("non-finite value at index {index}")]
    NonFinite { index: u64 },
    #[error("content hash mismatch: expected {expected}, got {got}")]
    HashMismatch { expected: String, got: String },
    #[error("{0}")]
    CodecSpec(#[from] crate::codec::CodecSpecError),
    #[error("index {index} is out of range for dimension {dimension}")]
    IndexOutOfRange { index: u64, dimension: u64 },
    #[error("index {index} at position {position} does not increase on {previous}")]
    IndicesNotIncreasing {
        position: u64,
        index: u64,
        previous: u64,
    },
    #[error("{what}: declared {got}, expected {expected}")]
    CountMismatch {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("non-finite scale in block {block}")]
    NonFiniteScale { block: u64 },
    #[error("compressed update decompresses past {bytes_max} bytes")]
    DecompressedTooLarge { bytes_max: u64 },
}

impl ProtoError {
    /// The reject code a peer is told when its input fails this way.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            ProtoError::FrameTooLarge { .. }
            | ProtoError::LimitExceeded { .. }
            | ProtoError::DecompressedTooLarge { .. } => RejectCode::TooLarge,
            ProtoError::Malformed(_)
            | ProtoError::MissingField(_)
            | ProtoError::BadLength { .. }
            | ProtoError::UnknownEnum { .. }
            | ProtoError::Invalid { .. }
            | ProtoError::CodecSpec(_)
            | ProtoError::IndexOutOfRange { .. }
            | ProtoError::IndicesNotIncreasing { .. }
            | ProtoError::CountMismatch { .. } => RejectCode::Malformed,
            ProtoError::WrongDirection(_) => RejectCode::ProtocolViolation,
            ProtoError::BadSignature => RejectCode::BadSignature,
            ProtoError::DimensionMismatch { .. } => RejectCode::DimensionMismatch,
            ProtoError::NonFinite { .. } | ProtoError::NonFiniteScale { .. } => {
                RejectCode::NonFinite
            }
            ProtoError::HashMismatch { .. } => RejectCode::HashMismatch,
        }
    }
}

impl From<prost::DecodeError> for ProtoError {
    fn from(e: prost::DecodeError) -> Self {
        ProtoError::Malformed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_codes_round_trip_through_wire() {
        for c in RejectCode::ALL {
            assert_eq!(RejectCode::from_wire(c.to_wire() as i32), Ok(c));
        }
        assert!(RejectCode::from_wire(0).is_err());
        assert!(RejectCode::from_wire(999).is_err());
    }
}
