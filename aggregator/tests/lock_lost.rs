//! The real server on PostgreSQL whose database lock's session the server
//! ends (`pg_terminate_backend`, as a restart or a cut network would): it
//! stops with the store's typed error, and the database is free for the
//! next aggregator. (SQLite's lock is the state directory's open file: it
//! cannot be lost while the process runs.)

use std::sync::Arc;
use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::{ADVISORY_KEY, Store, StoreError, testing};
use fedge_aggregator::tls::TlsIdentity;
use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_database_lock_is_lost_stops_with_the_typed_error_postgres() {
    let db = testing::fresh_postgres("server_lock_lost").await;
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 2,
            rounds: 1,
            ..CoordinatorConfig::default()
        },
        lock_check: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let server = Server::bind(cfg, &identity, store).unwrap();
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[4])]).unwrap());
    let model = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.0; 4]).unwrap(),
    };
    let serving = tokio::spawn(server.run(model, std::future::pending()));
    assert_eq!(testing::end_lock_session(&db).await, 1);
    let e = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap_err();
    match e.downcast_ref::<StoreError>() {
        Some(StoreError::DatabaseLockLost { key, .. }) => assert_eq!(*key, ADVISORY_KEY),
        _ => panic!("expected the database lock lost, got {e:#}"),
    }
    // The next aggregator takes the state directory and the database.
    Store::open_with(dir.path(), &db)
        .await
        .unwrap()
        .close()
        .await;
}
