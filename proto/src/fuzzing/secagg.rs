//! The SecAgg+ message targets (see the parent module), with the
//! messages their seeds and the round-trip test are made of.

use prost::Message;

use crate::{Limits, wire};

/// `secagg_device_msg`: a device's SecAgg+ message
/// (`msg::secagg::decode_device`); an accepted one re-encodes (with the
/// ring bits it named) to bytes that decode to the same message.
pub fn secagg_device_msg(data: &[u8]) {
    use crate::msg::secagg::{decode_device, encode_device};
    use crate::wire::sec_agg_device_msg::Stage;
    let Ok((round, m)) = decode_device(data, &Limits::default()) else {
        return;
    };
    let bits = match wire::SecAggDeviceMsg::decode(data).map(|w| w.stage) {
        Ok(Some(Stage::MaskedInput(mi))) => mi.bits,
        _ => 32,
    };
    let bytes = encode_device(round, bits, &m);
    let back = decode_device(&bytes, &Limits::default()).expect("own encoding decodes");
    assert_eq!(back, (round, m));
    assert_eq!(
        encode_device(back.0, bits, &back.1),
        bytes,
        "encoding is canonical"
    );
}

/// `secagg_agg_msg`: the aggregator's SecAgg+ message
/// (`msg::secagg::decode_agg`), round-tripped likewise.
pub fn secagg_agg_msg(data: &[u8]) {
    use crate::msg::secagg::{decode_agg, encode_agg};
    let Ok((round, m)) = decode_agg(data, &Limits::default()) else {
        return;
    };
    let bytes = encode_agg(round, &m);
    let back = decode_agg(&bytes, &Limits::default()).expect("own encoding decodes");
    assert_eq!(back, (round, m));
    assert_eq!(encode_agg(back.0, &back.1), bytes, "encoding is canonical");
}

pub(super) fn secagg_device_msg_seeds() -> Vec<Vec<u8>> {
    use crate::msg::secagg::encode_device;
    secagg_device_msg_samples()
        .iter()
        .map(|(bits, m)| encode_device(9, *bits, m).to_vec())
        .collect()
}

/// One of every SecAgg+ device message with the ring bits to encode it
/// with: the seeds of `secagg_device_msg` and the messages the round-trip
/// tests check.
pub fn secagg_device_msg_samples() -> Vec<(u32, crate::secagg::DeviceSecAgg)> {
    use crate::secagg::DeviceSecAgg;
    use crate::secagg::msg::{AdvertiseKeys, RevealedShare, SEALED_SHARE_BYTES, SealedShare};
    vec![
        (
            32,
            DeviceSecAgg::AdvertiseKeys(AdvertiseKeys {
                c_public: [1; 32],
                s_public: [2; 32],
            }),
        ),
        (
            32,
            DeviceSecAgg::ShareKeys(vec![
                SealedShare {
                    peer: 3,
                    ciphertext: vec![4; SEALED_SHARE_BYTES],
                },
                SealedShare {
                    peer: 7,
                    ciphertext: vec![8; SEALED_SHARE_BYTES],
                },
            ]),
        ),
        (
            20,
            DeviceSecAgg::MaskedInput(vec![0, 1, (1 << 20) - 1, 12345]),
        ),
        (
            32,
            DeviceSecAgg::Unmask {
                self_mask: vec![RevealedShare {
                    owner: 1,
                    share: [5; 32],
                }],
                mask_key: vec![RevealedShare {
                    owner: 2,
                    share: [6; 32],
                }],
            },
        ),
    ]
}

pub(super) fn secagg_agg_msg_seeds() -> Vec<Vec<u8>> {
    use crate::msg::secagg::encode_agg;
    secagg_agg_msg_samples()
        .iter()
        .map(|m| encode_agg(9, m).to_vec())
        .collect()
}

/// One of every SecAgg+ aggregator message (see
/// [`secagg_device_msg_samples`]).
pub fn secagg_agg_msg_samples() -> Vec<crate::secagg::AggSecAgg> {
    use crate::secagg::AggSecAgg;
    use crate::secagg::msg::{PeerKeys, SEALED_SHARE_BYTES, SealedShare};
    vec![
        AggSecAgg::NeighbourKeys(vec![PeerKeys {
            device: 1,
            c_public: [7; 32],
            s_public: [8; 32],
        }]),
        AggSecAgg::RoutedShares(vec![SealedShare {
            peer: 2,
            ciphertext: vec![9; SEALED_SHARE_BYTES],
        }]),
        AggSecAgg::UnmaskRequest {
            survivors: vec![1, 4, 6],
        },
    ]
}
