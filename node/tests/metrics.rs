//! The Prometheus endpoint serves the node's own metrics and libp2p's over real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pixmarket_ledger::Ledger;
use pixmarket_node::network::NetConfig;
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::SecretKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_node_and_libp2p_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[42; 32]);
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), key.public()).unwrap());
    let node = Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            ..NetConfig::default()
        },
        provide: None,
        metrics: Some("127.0.0.1:0".parse().unwrap()),
    })
    .await
    .unwrap();
    let addr = node.metrics_addr().unwrap();
    let page = get(addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for name in [
        "pixmarket_queue_length",
        "pixmarket_peers",
        "pixmarket_spent_microtokens_total",
        "libp2p_",
    ] {
        assert!(page.contains(name), "{name} missing from:\n{page}");
    }
    assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    node.shutdown().await;
}
