//! A client that speaks the protocol's frames by hand over real QUIC
//! and TLS (a modified binary), for tests of what the aggregator does
//! with what a stock device never sends.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use fedge_device::transport::{QuicTiming, Trust, client_config};
use fedge_proto::io::{read_frame, write_frame};
use fedge_proto::msg::{Capabilities, Hello};
use fedge_proto::sign::{self, SigningKey, TLS_EXPORTER_LABEL};
use fedge_proto::{AggMsg, DeviceMsg, Limits, ModelVersion, RejectCode, SCHEMA_VERSION};

/// How long a test waits for an answer.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Raw {
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub binding: [u8; 32],
    /// The federation id the aggregator named at authentication.
    pub federation: [u8; 32],
}

impl Raw {
    /// Connected and authenticated as `key`.
    pub async fn authenticated(addr: SocketAddr, fp: [u8; 32], key: &SigningKey) -> Raw {
        let mut c = Raw::connect(addr, fp).await;
        c.auth(key).await;
        c
    }

    pub async fn connect(addr: SocketAddr, fp: [u8; 32]) -> Raw {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(
            client_config(&Trust::Pinned(fp), &QuicTiming::default()).unwrap(),
        );
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, TLS_EXPORTER_LABEL, b"")
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Raw {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            binding,
            federation: [0; 32],
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, m: &DeviceMsg) {
        write_frame(&mut self.send, &m.encode()).await.unwrap();
    }

    pub async fn recv(&mut self) -> AggMsg {
        let f = tokio::time::timeout(WAIT, read_frame(&mut self.recv, 4 << 20))
            .await
            .expect("answer in time")
            .unwrap()
            .expect("a frame");
        AggMsg::decode(&f, &Limits::default()).unwrap()
    }

    pub async fn expect_reject(&mut self, code: RejectCode, fatal: bool) -> String {
        match self.recv().await {
            AggMsg::Reject {
                code: c,
                detail,
                fatal: f,
            } => {
                assert_eq!((c, f), (code, fatal), "{detail}");
                detail
            }
            other => panic!("expected reject {code}, got {other:?}"),
        }
    }

    pub async fn expect_closed(&mut self) {
        let closed = tokio::time::timeout(WAIT, self.conn.closed()).await;
        assert!(closed.is_ok(), "connection closed by the aggregator");
    }

    pub async fn hello(&mut self, key: &SigningKey, schema: u32) {
        self.send(&DeviceMsg::Hello(Hello {
            schema_version: schema,
            device_public_key: key.verifying_key(),
            runtime_version: "test".into(),
            capabilities: Capabilities::default(),
        }))
        .await;
    }

    pub async fn auth(&mut self, key: &SigningKey) {
        self.hello(key, SCHEMA_VERSION).await;
        let AggMsg::Challenge { nonce, .. } = self.recv().await else {
            panic!("challenge")
        };
        let signature = sign::sign_auth(key, &nonce, &self.binding);
        self.send(&DeviceMsg::AuthResponse { signature }).await;
        match self.recv().await {
            AggMsg::AuthOk { federation_id, .. } => self.federation = federation_id,
            other => panic!("expected auth_ok, got {other:?}"),
        }
    }

    pub async fn offer(&mut self) -> (u64, ModelVersion) {
        self.send(&DeviceMsg::TaskRequest {
            have_model_version: None,
        })
        .await;
        match self.recv().await {
            AggMsg::TaskOffer(o) => (o.round_id, o.model.version),
            other => panic!("expected an offer, got {other:?}"),
        }
    }
}
