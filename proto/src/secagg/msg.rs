//! The domain messages of the four stages. Wire forms and their limits
//! are in [`crate::msg`]; these are what the state machines see.

/// Bytes of a share's plaintext: sender, recipient (u32 LE each), the
/// share of the self-mask seed and the share of the mask secret key.
pub const SHARE_PLAINTEXT_BYTES: usize = 4 + 4 + 32 + 32;
/// Bytes of a sealed share (plaintext plus the Poly1305 tag).
pub const SEALED_SHARE_BYTES: usize = SHARE_PLAINTEXT_BYTES + 16;

/// Stage 1, device to aggregator: the device's two public keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub c_public: [u8; 32],
    pub s_public: [u8; 32],
}

/// A neighbour's public keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKeys {
    pub device: u32,
    pub c_public: [u8; 32],
    pub s_public: [u8; 32],
}

/// A share sealed for one neighbour: `peer` is the recipient on the way
/// up and the sender on the way down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedShare {
    pub peer: u32,
    pub ciphertext: Vec<u8>,
}

/// A share revealed at unmasking: `owner`'s secret, the revealer's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevealedShare {
    pub owner: u32,
    pub share: [u8; 32],
}

/// Device to aggregator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSecAgg {
    /// Stage 1.
    AdvertiseKeys(AdvertiseKeys),
    /// Stage 2: one sealed share per neighbour the device was told of.
    ShareKeys(Vec<SealedShare>),
    /// Stage 3: the masked update in Z_{2^b}.
    MaskedInput(Vec<u64>),
    /// Stage 4: shares of surviving neighbours' self-mask seeds and of
    /// dropped neighbours' mask keys.
    Unmask {
        self_mask: Vec<RevealedShare>,
        mask_key: Vec<RevealedShare>,
    },
}

impl DeviceSecAgg {
    /// The stage this message answers.
    pub fn stage(&self) -> super::Stage {
        use super::Stage;
        match self {
            DeviceSecAgg::AdvertiseKeys(_) => Stage::AdvertiseKeys,
            DeviceSecAgg::ShareKeys(_) => Stage::ShareKeys,
            DeviceSecAgg::MaskedInput(_) => Stage::MaskedInput,
            DeviceSecAgg::Unmask { .. } => Stage::Unmasking,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            DeviceSecAgg::AdvertiseKeys(_) => "AdvertiseKeys",
            DeviceSecAgg::ShareKeys(_) => "ShareKeys",
            DeviceSecAgg::MaskedInput(_) => "MaskedInput",
            DeviceSecAgg::Unmask { .. } => "Unmask",
        }
    }
}

/// Aggregator to device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AggSecAgg {
    /// Start of stage 2: the device's neighbours that advertised keys.
    NeighbourKeys(Vec<PeerKeys>),
    /// Start of stage 3: the shares the device's neighbours in U2 sealed
    /// for it.
    RoutedShares(Vec<SealedShare>),
    /// Start of stage 4: the device's neighbours in U3.
    UnmaskRequest { survivors: Vec<u32> },
}

impl AggSecAgg {
    pub fn name(&self) -> &'static str {
        match self {
            AggSecAgg::NeighbourKeys(_) => "NeighbourKeys",
            AggSecAgg::RoutedShares(_) => "RoutedShares",
            AggSecAgg::UnmaskRequest { .. } => "UnmaskRequest",
        }
    }
}
