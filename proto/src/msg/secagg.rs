//! SecAgg+ messages on the wire: conversion between the prost bodies
//! (`wire::SecAggDeviceMsg`, `wire::SecAggAggMsg`) and the domain messages
//! of [`crate::secagg::msg`], rejecting bad input with a typed
//! [`ProtoError`] before anything of a peer-chosen size is allocated: keys
//! and shares have fixed lengths, every list is at most a neighbourhood
//! ([`DEGREE_MAX`]) long, a masked input's packed length is checked
//! against its declared dimension (itself bounded by
//! `Limits::update_dimension_max`) before it is unpacked, and every value
//! must lie in its ring.
//!
//! A masked input is packed in `ceil(bits / 8)` little-endian bytes per
//! value: exactly the size of the same quantized update sent in the clear.

use bytes::Bytes;
use prost::Message;

use super::SecAggOffer;
use crate::secagg::graph::DEGREE_MAX;
use crate::secagg::mask::ring_mask;
use crate::secagg::msg::{AdvertiseKeys, PeerKeys, RevealedShare, SEALED_SHARE_BYTES, SealedShare};
use crate::secagg::quant::{BITS_MAX, BITS_MIN};
use crate::secagg::{AggSecAgg, DeviceSecAgg};
use crate::wire::sec_agg_agg_msg::Stage as AggStage;
use crate::wire::sec_agg_device_msg::Stage as DeviceStage;
use crate::{Limits, ProtoError, wire};

/// Bytes per packed value in Z_{2^bits}.
pub fn value_bytes(bits: u32) -> usize {
    bits.div_ceil(8) as usize
}

/// Pack values of Z_{2^bits} (`ceil(bits/8)` bytes each, little-endian).
pub fn pack(bits: u32, values: &[u64]) -> Vec<u8> {
    let w = value_bytes(bits);
    let mut out = Vec::with_capacity(values.len() * w);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes()[..w]);
    }
    out
}

/// Encode a device's message of round `round`; `bits` is the round's ring
/// (used by a masked input).
pub fn encode_device(round: u64, bits: u32, msg: &DeviceSecAgg) -> Bytes {
    device_to_wire(round, bits, msg).encode_to_vec().into()
}

/// A device's message as its prost body (also carried in the session's
/// envelope, `DeviceMsg::SecAgg`).
pub fn device_to_wire(round: u64, bits: u32, msg: &DeviceSecAgg) -> wire::SecAggDeviceMsg {
    let stage = match msg {
        DeviceSecAgg::AdvertiseKeys(k) => DeviceStage::AdvertiseKeys(wire::SecAggAdvertiseKeys {
            c_public: k.c_public.to_vec().into(),
            s_public: k.s_public.to_vec().into(),
        }),
        DeviceSecAgg::ShareKeys(shares) => DeviceStage::ShareKeys(shares_to_wire(shares)),
        DeviceSecAgg::MaskedInput(values) => DeviceStage::MaskedInput(wire::SecAggMaskedInput {
            bits,
            dimension: values.len() as u32,
            packed: pack(bits, values).into(),
        }),
        DeviceSecAgg::Unmask {
            self_mask,
            mask_key,
        } => {
            let conv = |l: &[RevealedShare]| {
                l.iter()
                    .map(|r| wire::SecAggRevealedShare {
                        owner: r.owner,
                        share: r.share.to_vec().into(),
                    })
                    .collect()
            };
            DeviceStage::Unmask(wire::SecAggUnmask {
                self_mask: conv(self_mask),
                mask_key: conv(mask_key),
            })
        }
    };
    wire::SecAggDeviceMsg {
        round_id: round,
        stage: Some(stage),
    }
}

/// Decode a device's message: its round and the domain message.
pub fn decode_device(frame: &[u8], limits: &Limits) -> Result<(u64, DeviceSecAgg), ProtoError> {
    Limits::check(
        "frame bytes",
        frame.len() as u64,
        limits.frame_bytes_max.into(),
    )?;
    let (round, _, msg) = device_from_wire(wire::SecAggDeviceMsg::decode(frame)?, limits)?;
    Ok((round, msg))
}

/// A device's message from its prost body: its round, the ring of a
/// masked input (0 for the other stages) and the domain message.
pub fn device_from_wire(
    m: wire::SecAggDeviceMsg,
    limits: &Limits,
) -> Result<(u64, u32, DeviceSecAgg), ProtoError> {
    let stage = m.stage.ok_or(ProtoError::MissingField("secagg.stage"))?;
    let mut bits = 0;
    let msg = match stage {
        DeviceStage::AdvertiseKeys(k) => DeviceSecAgg::AdvertiseKeys(AdvertiseKeys {
            c_public: key32("c_public", &k.c_public)?,
            s_public: key32("s_public", &k.s_public)?,
        }),
        DeviceStage::ShareKeys(s) => DeviceSecAgg::ShareKeys(shares_from_wire(s)?),
        DeviceStage::MaskedInput(mi) => {
            bits = mi.bits;
            DeviceSecAgg::MaskedInput(unpack(&mi, limits)?)
        }
        DeviceStage::Unmask(u) => {
            check_count("revealed shares", u.self_mask.len() + u.mask_key.len())?;
            let conv = |l: Vec<wire::SecAggRevealedShare>| {
                l.into_iter()
                    .map(|r| {
                        Ok(RevealedShare {
                            owner: r.owner,
                            share: key32("share", &r.share)?,
                        })
                    })
                    .collect::<Result<Vec<_>, ProtoError>>()
            };
            DeviceSecAgg::Unmask {
                self_mask: conv(u.self_mask)?,
                mask_key: conv(u.mask_key)?,
            }
        }
    };
    Ok((m.round_id, bits, msg))
}

/// Encode the aggregator's message of round `round`.
pub fn encode_agg(round: u64, msg: &AggSecAgg) -> Bytes {
    agg_to_wire(round, msg).encode_to_vec().into()
}

/// The aggregator's message as its prost body (also carried in the
/// session's envelope, `AggMsg::SecAgg`).
pub fn agg_to_wire(round: u64, msg: &AggSecAgg) -> wire::SecAggAggMsg {
    let stage = match msg {
        AggSecAgg::NeighbourKeys(peers) => AggStage::NeighbourKeys(wire::SecAggNeighbourKeys {
            peers: peers
                .iter()
                .map(|p| wire::SecAggPeerKeys {
                    device: p.device,
                    c_public: p.c_public.to_vec().into(),
                    s_public: p.s_public.to_vec().into(),
                })
                .collect(),
        }),
        AggSecAgg::RoutedShares(shares) => AggStage::RoutedShares(shares_to_wire(shares)),
        AggSecAgg::UnmaskRequest { survivors } => {
            AggStage::UnmaskRequest(wire::SecAggUnmaskRequest {
                survivors: survivors.clone(),
            })
        }
    };
    wire::SecAggAggMsg {
        round_id: round,
        stage: Some(stage),
    }
}

/// Decode the aggregator's message: its round and the domain message.
pub fn decode_agg(frame: &[u8], limits: &Limits) -> Result<(u64, AggSecAgg), ProtoError> {
    Limits::check(
        "frame bytes",
        frame.len() as u64,
        limits.frame_bytes_max.into(),
    )?;
    agg_from_wire(wire::SecAggAggMsg::decode(frame)?)
}

/// The aggregator's message from its prost body.
pub fn agg_from_wire(m: wire::SecAggAggMsg) -> Result<(u64, AggSecAgg), ProtoError> {
    let stage = m.stage.ok_or(ProtoError::MissingField("secagg.stage"))?;
    let msg = match stage {
        AggStage::NeighbourKeys(n) => {
            check_count("neighbours", n.peers.len())?;
            AggSecAgg::NeighbourKeys(
                n.peers
                    .into_iter()
                    .map(|p| {
                        Ok(PeerKeys {
                            device: p.device,
                            c_public: key32("c_public", &p.c_public)?,
                            s_public: key32("s_public", &p.s_public)?,
                        })
                    })
                    .collect::<Result<_, ProtoError>>()?,
            )
        }
        AggStage::RoutedShares(s) => AggSecAgg::RoutedShares(shares_from_wire(s)?),
        AggStage::UnmaskRequest(r) => {
            check_count("survivors", r.survivors.len())?;
            AggSecAgg::UnmaskRequest {
                survivors: r.survivors,
            }
        }
    };
    Ok((m.round_id, msg))
}

fn shares_to_wire(shares: &[SealedShare]) -> wire::SecAggShareKeys {
    wire::SecAggShareKeys {
        shares: shares
            .iter()
            .map(|s| wire::SecAggSealedShare {
                peer: s.peer,
                ciphertext: s.ciphertext.to_vec().into(),
            })
            .collect(),
    }
}

fn shares_from_wire(s: wire::SecAggShareKeys) -> Result<Vec<SealedShare>, ProtoError> {
    check_count("sealed shares", s.shares.len())?;
    s.shares
        .into_iter()
        .map(|s| {
            if s.ciphertext.len() != SEALED_SHARE_BYTES {
                return Err(ProtoError::BadLength {
                    field: "ciphertext",
                    expected: SEALED_SHARE_BYTES,
                    got: s.ciphertext.len(),
                });
            }
            Ok(SealedShare {
                peer: s.peer,
                ciphertext: s.ciphertext.to_vec(),
            })
        })
        .collect()
}

fn check_count(what: &'static str, n: usize) -> Result<(), ProtoError> {
    Limits::check(what, n as u64, DEGREE_MAX.into())
}

fn key32(field: &'static str, b: &Bytes) -> Result<[u8; 32], ProtoError> {
    b.as_ref().try_into().map_err(|_| ProtoError::BadLength {
        field,
        expected: 32,
        got: b.len(),
    })
}

fn unpack(mi: &wire::SecAggMaskedInput, limits: &Limits) -> Result<Vec<u64>, ProtoError> {
    if !(BITS_MIN..=BITS_MAX).contains(&mi.bits) {
        return Err(ProtoError::Invalid {
            field: "bits",
            reason: format!("{} is not in {BITS_MIN}..={BITS_MAX}", mi.bits),
        });
    }
    Limits::check(
        "masked input dimension",
        mi.dimension.into(),
        limits.update_dimension_max,
    )?;
    // Unpacked, each value takes 8 bytes: at most twice the frame limit,
    // so a peer cannot make a small ring multiply what it costs to hold.
    Limits::check(
        "masked input unpacked bytes",
        u64::from(mi.dimension) * 8,
        2 * u64::from(limits.frame_bytes_max),
    )?;
    let w = value_bytes(mi.bits);
    let expected = mi.dimension as u64 * w as u64;
    if mi.packed.len() as u64 != expected {
        return Err(ProtoError::CountMismatch {
            what: "packed bytes",
            expected,
            got: mi.packed.len() as u64,
        });
    }
    let m = ring_mask(mi.bits);
    mi.packed
        .chunks_exact(w)
        .enumerate()
        .map(|(i, c)| {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            if v > m {
                return Err(ProtoError::Invalid {
                    field: "packed",
                    reason: format!("value {i} is outside Z_2^{}", mi.bits),
                });
            }
            Ok(v)
        })
        .collect()
}

/// A task offer's SecAgg+ part on the wire.
pub(super) fn offer_to_wire(o: &SecAggOffer) -> wire::SecAggOffer {
    let p = &o.params;
    wire::SecAggOffer {
        seed: p.seed.to_vec().into(),
        devices: p.devices,
        degree: p.degree,
        threshold: p.threshold,
        bits: p.bits,
        clip: p.clip,
        dimension: p.dimension,
        index: o.index,
        noise_multiplier: p.noise.map_or(0.0, |n| n.multiplier),
        noise_survivors: p.noise.map_or(0, |n| n.survivors),
    }
}

/// An offer's SecAgg+ part, checked before anything is sized by it: at
/// most [`crate::secagg::DEVICES_MAX`] devices (the graph is O(n)), a
/// dimension within the update limit, consistent parameters, an index
/// among the devices.
pub(super) fn offer_from_wire(
    o: wire::SecAggOffer,
    round: u64,
    limits: &Limits,
) -> Result<SecAggOffer, ProtoError> {
    Limits::check(
        "secagg devices",
        o.devices.into(),
        crate::secagg::DEVICES_MAX.into(),
    )?;
    Limits::check(
        "secagg dimension",
        o.dimension.into(),
        limits.update_dimension_max,
    )?;
    let params = crate::secagg::SecAggParams {
        round,
        seed: crate::sign::hash32("task_offer.secagg.seed", &o.seed)?,
        devices: o.devices,
        degree: o.degree,
        threshold: o.threshold,
        bits: o.bits,
        clip: o.clip,
        dimension: o.dimension,
        noise: (o.noise_multiplier != 0.0 || o.noise_survivors != 0).then_some(
            crate::secagg::DistributedNoise {
                multiplier: o.noise_multiplier,
                survivors: o.noise_survivors,
            },
        ),
    };
    params.validate().map_err(|e| ProtoError::Invalid {
        field: "task_offer.secagg",
        reason: e.to_string(),
    })?;
    if o.index >= o.devices {
        return Err(ProtoError::Invalid {
            field: "task_offer.secagg.index",
            reason: format!("index {} of {} devices", o.index, o.devices),
        });
    }
    Ok(SecAggOffer {
        params,
        index: o.index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn every_message_round_trips() {
        for (bits, m) in crate::fuzzing::secagg_device_msg_samples() {
            let bytes = encode_device(42, bits, &m);
            assert_eq!(decode_device(&bytes, &limits()).unwrap(), (42, m));
        }
        for m in crate::fuzzing::secagg_agg_msg_samples() {
            let bytes = encode_agg(7, &m);
            assert_eq!(decode_agg(&bytes, &limits()).unwrap(), (7, m));
        }
    }

    #[test]
    fn a_masked_input_costs_what_the_quantized_update_costs() {
        for (bits, w) in [(8, 1), (16, 2), (20, 3), (32, 4), (62, 8)] {
            assert_eq!(pack(bits, &[0; 1000]).len(), 1000 * w, "bits {bits}");
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let l = limits();
        let enc = |stage| {
            wire::SecAggDeviceMsg {
                round_id: 1,
                stage: Some(stage),
            }
            .encode_to_vec()
        };
        // A short key.
        let m = enc(DeviceStage::AdvertiseKeys(wire::SecAggAdvertiseKeys {
            c_public: vec![0; 31].into(),
            s_public: vec![0; 32].into(),
        }));
        assert_eq!(
            decode_device(&m, &l),
            Err(ProtoError::BadLength {
                field: "c_public",
                expected: 32,
                got: 31
            })
        );
        // A ciphertext of the wrong size.
        let m = enc(DeviceStage::ShareKeys(wire::SecAggShareKeys {
            shares: vec![wire::SecAggSealedShare {
                peer: 1,
                ciphertext: vec![0; 10].into(),
            }],
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::BadLength {
                field: "ciphertext",
                ..
            })
        ));
        // More shares than a neighbourhood.
        let m = enc(DeviceStage::ShareKeys(wire::SecAggShareKeys {
            shares: (0..300)
                .map(|p| wire::SecAggSealedShare {
                    peer: p,
                    ciphertext: vec![0; SEALED_SHARE_BYTES].into(),
                })
                .collect(),
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::LimitExceeded {
                what: "sealed shares",
                ..
            })
        ));
        // A dimension over the limit, announced with few bytes.
        let m = enc(DeviceStage::MaskedInput(wire::SecAggMaskedInput {
            bits: 32,
            dimension: u32::MAX,
            packed: vec![0; 8].into(),
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::LimitExceeded { .. })
        ));
        // Packed bytes that do not match the dimension.
        let m = enc(DeviceStage::MaskedInput(wire::SecAggMaskedInput {
            bits: 32,
            dimension: 3,
            packed: vec![0; 8].into(),
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::CountMismatch { .. })
        ));
        // A value outside the ring.
        let m = enc(DeviceStage::MaskedInput(wire::SecAggMaskedInput {
            bits: 12,
            dimension: 1,
            packed: vec![0xff, 0xff].into(),
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::Invalid {
                field: "packed",
                ..
            })
        ));
        // Bits out of range.
        let m = enc(DeviceStage::MaskedInput(wire::SecAggMaskedInput {
            bits: 64,
            dimension: 0,
            packed: Bytes::new(),
        }));
        assert!(matches!(
            decode_device(&m, &l),
            Err(ProtoError::Invalid { field: "bits", .. })
        ));
        // No stage; garbage; an oversized frame.
        assert_eq!(
            decode_device(
                &wire::SecAggDeviceMsg {
                    round_id: 1,
                    stage: None
                }
                .encode_to_vec(),
                &l
            ),
            Err(ProtoError::MissingField("secagg.stage"))
        );
        assert!(decode_agg(&[0xff, 0xff, 0xff], &l).is_err());
        let big = vec![0u8; l.frame_bytes_max as usize + 1];
        assert!(matches!(
            decode_agg(&big, &l),
            Err(ProtoError::LimitExceeded { .. })
        ));
        // Too many survivors.
        let m = wire::SecAggAggMsg {
            round_id: 1,
            stage: Some(AggStage::UnmaskRequest(wire::SecAggUnmaskRequest {
                survivors: (0..255).collect(),
            })),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_agg(&m, &l),
            Err(ProtoError::LimitExceeded {
                what: "survivors",
                ..
            })
        ));
    }
}
