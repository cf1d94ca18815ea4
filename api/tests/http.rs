//! The API over real loopback HTTP, served by real nodes (real libp2p, real sled, the tiny
//! engine): what an unauthenticated, foreign-origin, oversized or malformed request gets (the
//! documented 4xx, and no change to the books), OpenAI's generation in both response formats,
//! the async route seeing the same job with its progress, and a deposit recorded while a job
//! runs showing at once and surviving the node's stop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use base64::Engine as _;
use pixmarket_api::client::{ApiClient, ClientError, Method};
use pixmarket_api::{Api, ApiSettings};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_tests::{TestNode, tiny_generator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (request line and headers, without the blank line) and `body` as one HTTP/1.1
/// request, and reads the whole answer: (status, JSON body or Null).
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The server may answer (and close) before it has read a body it refuses.
    let _ = s.write_all(body).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

async fn start_api(node: &TestNode, seed: u8) -> Api {
    let settings = ApiSettings::new("127.0.0.1:0".parse().unwrap(), node.dir.path().to_owned());
    Api::start(
        &node.node,
        pixmarket_protocol::SecretKey::from_seed(&[seed; 32]),
        settings,
    )
    .await
    .unwrap()
}

fn client(api: &Api) -> ApiClient {
    ApiClient::new(api.addr().to_string(), api.token())
}

/// The books' head and the peer's account: what a refused request must leave as it was.
fn books(ledger: &Ledger, peer: &pixmarket_protocol::PublicKey) -> String {
    format!(
        "{:?} {:?} {:?}",
        ledger.head().unwrap(),
        ledger.account(Role::Provider, peer).unwrap(),
        ledger.default_credit().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_their_4xx_and_change_nothing() {
    let node = TestNode::start(31, vec![], None).await;
    let mut settings = ApiSettings::new("127.0.0.1:0".parse().unwrap(), node.dir.path().to_owned());
    let reader = "r".repeat(40);
    settings.named_tokens = vec![("dashboard".into(), reader.clone(), vec!["read".into()])];
    let api = Api::start(
        &node.node,
        pixmarket_protocol::SecretKey::from_seed(&[31; 32]),
        settings,
    )
    .await
    .unwrap();
    let addr = api.addr();
    let token = api.token().to_owned();
    // The token file holds the cookie, readable by the owner only.
    let file = node.dir.path().join(pixmarket_api::TOKEN_FILE);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let peer = pixmarket_protocol::SecretKey::from_seed(&[99; 32]).public();
    let path = format!("/api/v1/accounts/{}/deposits", peer.to_peer_id());
    let before = books(node.node.ledger(), &peer);
    let auth = format!("Authorization: Bearer {token}");
    let json_ct = "Content-Type: application/json";
    let good = br#"{"tokens": "5"}"#;

    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "no token",
            format!("POST {path} HTTP/1.1\r\n{json_ct}"),
            good.to_vec(),
            401,
            "invalid_api_key",
        ),
        (
            "a wrong token",
            format!(
                "POST {path} HTTP/1.1\r\n{json_ct}\r\nAuthorization: Bearer {}",
                "0".repeat(64)
            ),
            good.to_vec(),
            401,
            "invalid_api_key",
        ),
        (
            "a token that is not bearer",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\nAuthorization: Basic {token}"),
            good.to_vec(),
            401,
            "invalid_api_key",
        ),
        (
            "a foreign origin with the right token",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}\r\nOrigin: https://evil.example"),
            good.to_vec(),
            403,
            "foreign_origin",
        ),
        (
            "a read-only token",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\nAuthorization: Bearer {reader}"),
            good.to_vec(),
            403,
            "insufficient_scope",
        ),
        (
            "an oversized body",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            format!(
                r#"{{"tokens": "5", "memo": "{}"}}"#,
                "x".repeat(pixmarket_api::MAX_JSON_BODY)
            )
            .into_bytes(),
            413,
            "body_too_large",
        ),
        (
            "malformed JSON",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            b"{\"tokens\": ".to_vec(),
            400,
            "invalid_value",
        ),
        (
            "an unknown field",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            br#"{"tokens": "5", "account": "me"}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "a negative amount",
            format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            br#"{"tokens": "-5"}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "not a peer id",
            format!("POST /api/v1/accounts/alice/deposits HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            good.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "not JSON",
            format!("POST {path} HTTP/1.1\r\nContent-Type: text/plain\r\n{auth}"),
            good.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "a bad default credit",
            format!("PUT /api/v1/default-credit HTTP/1.1\r\n{json_ct}\r\n{auth}"),
            br#"{"tokens": "1.0000001"}"#.to_vec(),
            400,
            "invalid_value",
        ),
    ];
    for (what, head, body, status, code) in cases {
        let (got, answer) = raw(addr, &head, &body).await;
        assert_eq!(got, status, "{what}: {answer}");
        let e = &answer["error"];
        assert_eq!(e["code"], code, "{what}: {answer}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {answer}"
        );
        assert!(
            e.get("type").is_some() && e.get("param").is_some(),
            "{what}: {answer}"
        );
        assert_eq!(
            books(node.node.ledger(), &peer),
            before,
            "{what} changed the books"
        );
    }
    // A bad size names `size`, as OpenAI's clients expect.
    let (got, answer) = raw(
        addr,
        &format!("POST /v1/images/generations HTTP/1.1\r\n{json_ct}\r\n{auth}"),
        br#"{"prompt": "a cat", "size": "100x100"}"#,
    )
    .await;
    assert_eq!(got, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "size", "{answer}");
    // The same origin is a browser on this API's own page: allowed.
    let (got, answer) = raw(
        addr,
        &format!("GET /api/v1/accounts HTTP/1.1\r\n{auth}\r\nOrigin: http://{addr}"),
        b"",
    )
    .await;
    assert_eq!(got, 200, "{answer}");
    // And the right request does what the refused ones did not.
    let (got, answer) = raw(
        addr,
        &format!("POST {path} HTTP/1.1\r\n{json_ct}\r\n{auth}"),
        good,
    )
    .await;
    assert_eq!(got, 201, "{answer}");
    assert_eq!(answer["account"]["deposits"]["tokens"], "5.000000");
    assert_ne!(books(node.node.ledger(), &peer), before);
    api.shutdown().await;
    assert!(!file.exists(), "the token file outlived the API");
    node.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after() {
    let node = TestNode::start(32, vec![], None).await;
    let mut settings = ApiSettings::new("127.0.0.1:0".parse().unwrap(), node.dir.path().to_owned());
    // Two requests, and a refill too slow to give a third during the test.
    settings.rate_per_second = 0;
    settings.burst = 2;
    let api = Api::start(
        &node.node,
        pixmarket_protocol::SecretKey::from_seed(&[32; 32]),
        settings,
    )
    .await
    .unwrap();
    let c = client(&api);
    c.call(Method::GET, "/api/v1/accounts", None).await.unwrap();
    c.call(Method::GET, "/api/v1/accounts", None).await.unwrap();
    match c.call(Method::GET, "/api/v1/accounts", None).await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status.as_u16(), 429);
            assert!(message.contains("too many requests"), "{message}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    api.shutdown().await;
    node.node.shutdown().await;
}

/// Polls `check` on the API until it gives `Some`: each poll is one real request.
async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..3000 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_generation_is_an_async_job_and_a_running_deposit_sticks() {
    let provider = TestNode::start(33, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(34, vec![provider.addr.clone()], None).await;
    provider.deposit_from(33, requester.key, 100);
    let buyer_api = start_api(&requester, 34).await;
    let seller_api = start_api(&provider, 33).await;
    let buyer = client(&buyer_api);
    let seller = client(&seller_api);

    // The market's models, once the provider's advert arrives.
    let model = until("an advert", async || {
        let v = buyer.call(Method::GET, "/v1/models", None).await.unwrap();
        v["data"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    assert_eq!(model, pixmarket_engine::drawn::DRAWN_MODEL_ID);

    // b64_json: a 64×64 PNG, and the charge in the extension field.
    let v = buyer
        .call(
            Method::POST,
            "/v1/images/generations",
            Some(&json!({"model": model, "prompt": "a red circle", "size": "64x64", "seed": 7})),
        )
        .await
        .unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let ext = &v["pixmarket"];
    let stored = requester
        .node
        .ledger()
        .receipts(Some(&provider.key))
        .unwrap();
    assert_eq!(stored.len(), 1);
    let receipt = stored[0].receipt.verify().unwrap();
    assert_eq!(ext["cost"]["micro"], receipt.cost.0);
    assert_eq!(ext["receipt"], stored[0].receipt.digest().to_string());
    assert_eq!(ext["provider"], provider.key.to_peer_id().to_string());

    // url, as JPEG: served by the node, with the token.
    let v = buyer
        .call(
            Method::POST,
            "/v1/images/generations",
            Some(&json!({"prompt": "a blue square", "response_format": "url", "output_format": "jpeg"})),
        )
        .await
        .unwrap();
    let url = v["data"][0]["url"].as_str().unwrap();
    let path = url
        .strip_prefix(&format!("http://{}", buyer_api.addr()))
        .unwrap();
    let (status, _) = raw(buyer_api.addr(), &format!("GET {path} HTTP/1.1"), b"").await;
    assert_eq!(status, 401, "an image URL needs the token too");
    let mut s = tokio::net::TcpStream::connect(buyer_api.addr())
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            buyer_api.token()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let img =
        image::load_from_memory_with_format(&answer[body_at..], image::ImageFormat::Jpeg).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // Streamed: keep-alive comments, then one completed event with the image.
    let body = json!({"prompt": "a stream", "stream": true}).to_string();
    let mut s = tokio::net::TcpStream::connect(buyer_api.addr())
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            buyer_api.token(),
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("text/event-stream"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no event in {text}"));
    let event: Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["type"], "image_generation.completed");
    let png = base64::engine::general_purpose::STANDARD
        .decode(event["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert!(event["pixmarket"]["receipt"].is_string(), "{event}");

    // A longer job on the OpenAI route, watched on the async route by its id.
    let openai_call = {
        let buyer = buyer.clone();
        tokio::spawn(async move {
            buyer
                .call(
                    Method::POST,
                    "/v1/images/generations",
                    Some(&json!({"prompt": "a green triangle", "num_inference_steps": 60})),
                )
                .await
        })
    };
    let (id, step) = until("the job running", async || {
        let list = buyer.call(Method::GET, "/api/v1/jobs", None).await.unwrap();
        let job = list["data"]
            .as_array()?
            .iter()
            .find(|j| j["request"]["prompt"] == "a green triangle")?
            .clone();
        (job["status"] == "running" && job["step"].as_u64()? >= 1).then(|| {
            (
                job["id"].as_str().unwrap().to_owned(),
                job["step"].as_u64().unwrap(),
            )
        })
    })
    .await;
    // While it runs, the seller records a deposit: it shows at once.
    let buyer_peer = requester.key.to_peer_id().to_string();
    let before = seller
        .call(Method::GET, &format!("/api/v1/accounts/{buyer_peer}"), None)
        .await
        .unwrap();
    assert_eq!(before["provider"]["deposits"]["tokens"], "100.000000");
    let d = seller
        .call(
            Method::POST,
            &format!("/api/v1/accounts/{buyer_peer}/deposits"),
            Some(&json!({"tokens": "2.5", "memo": "while it runs"})),
        )
        .await
        .unwrap();
    assert_eq!(d["account"]["deposits"]["tokens"], "102.500000");
    let job_now = buyer
        .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
        .await
        .unwrap();
    assert!(
        job_now["status"] == "running" || job_now["status"] == "completed",
        "{job_now}"
    );
    let after = seller
        .call(Method::GET, &format!("/api/v1/accounts/{buyer_peer}"), None)
        .await
        .unwrap();
    assert_eq!(after["provider"]["deposits"]["tokens"], "102.500000");

    let done = openai_call.await.unwrap().unwrap();
    assert_eq!(done["pixmarket"]["job_id"], id.as_str());
    let status = buyer
        .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["result"]["receipt"], done["pixmarket"]["receipt"]);
    assert!(step >= 1);
    // The buyer records what it prepaid the seller: its mirror shows what is left to spend.
    let seller_peer = provider.key.to_peer_id().to_string();
    let p = buyer
        .call(
            Method::POST,
            &format!("/api/v1/accounts/{seller_peer}/prepaid"),
            Some(&json!({"tokens": "100", "memo": "paid by transfer"})),
        )
        .await
        .unwrap();
    let charged = p["account"]["charged"]["micro"].as_u64().unwrap();
    assert!(charged > 0, "{p}");
    assert_eq!(p["account"]["deposits"]["tokens"], "100.000000", "{p}");
    assert_eq!(
        p["account"]["available"]["micro"],
        100_000_000 - charged,
        "{p}"
    );

    // An async job with previews: while it runs, its status shows the latest one (a real
    // 16×16 PNG of the 64×64 image), and the seller's node status shows the job in the
    // provider's own queue with its step.
    let j = buyer
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(&json!({"prompt": "a yellow star", "num_inference_steps": 100, "partial_images": 3})),
        )
        .await
        .unwrap();
    let pid = j["id"].as_str().unwrap().to_owned();
    let on_device = until("the job on the provider's device", async || {
        let n = seller
            .call(Method::GET, "/api/v1/node", None)
            .await
            .unwrap();
        let running = n["provider_queue"]["running"].as_array()?.first()?.clone();
        (running["step"].as_u64()? >= 1).then_some((n, running))
    })
    .await;
    assert_eq!(
        on_device.1["requester"],
        requester.key.to_string(),
        "{on_device:?}"
    );
    assert_eq!(on_device.1["steps"], 100);
    assert_eq!(
        on_device.0["provider_queue"]["max_queue"]
            .as_u64()
            .map(|m| m > 0),
        Some(true)
    );
    let buyer_node = buyer.call(Method::GET, "/api/v1/node", None).await.unwrap();
    assert!(buyer_node["provider_queue"].is_null(), "{buyer_node}");
    // Both say what `pixmarket doctor` would: a verdict from its fixed words and advice.
    for n in [&on_device.0, &buyer_node] {
        let verdict = n["reachability"]["verdict"].as_str().unwrap_or_default();
        assert!(
            [
                "public",
                "behind NAT, hole-punchable",
                "relayed only",
                "unreachable",
                "unknown"
            ]
            .contains(&verdict),
            "{n}"
        );
        assert!(n["reachability"]["advice"].as_str().is_some(), "{n}");
    }
    let (preview, at_step) = until("a preview on the async route", async || {
        let job = buyer
            .call(Method::GET, &format!("/api/v1/jobs/{pid}"), None)
            .await
            .unwrap();
        let p = job["preview"].as_object()?.clone();
        (job["status"] == "running").then(|| (p, job["step"].as_u64().unwrap()))
    })
    .await;
    assert_eq!(preview["size"], "16x16");
    assert!(
        [25, 50, 75].contains(&preview["step"].as_u64().unwrap()),
        "{preview:?}"
    );
    assert!(at_step >= preview["step"].as_u64().unwrap());
    let png = base64::engine::general_purpose::STANDARD
        .decode(preview["b64_png"].as_str().unwrap())
        .unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    let done = until("the previewed job done", async || {
        let job = buyer
            .call(Method::GET, &format!("/api/v1/jobs/{pid}"), None)
            .await
            .unwrap();
        (job["status"] == "completed").then_some(job)
    })
    .await;
    assert!(done["result"]["receipt"].is_string(), "{done}");

    // A job submitted on the async route, cancelled while it waits or runs.
    let j = buyer
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(&json!({"prompt": "a long wait", "num_inference_steps": 100})),
        )
        .await
        .unwrap();
    let jid = j["id"].as_str().unwrap().to_owned();
    assert_eq!(j["status"], "queued", "{j}");
    let c = buyer
        .call(Method::POST, &format!("/api/v1/jobs/{jid}/cancel"), None)
        .await
        .unwrap();
    assert_eq!(c["status"], "cancelled");
    match buyer
        .call(Method::POST, &format!("/api/v1/jobs/{jid}/cancel"), None)
        .await
    {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status.as_u16(), 409),
        other => panic!("a second cancel must be 409, got {other:?}"),
    }

    // The deposit survives the seller's stop and the books verify.
    buyer_api.shutdown().await;
    seller_api.shutdown().await;
    let TestNode {
        node,
        dir,
        key: seller_key,
        ..
    } = provider;
    node.shutdown().await;
    requester.node.shutdown().await;
    // Reopened once the stopped node's tasks have let go of it (bounded, as the crash tests do).
    let path = TestNode::ledger_path(dir.path());
    let mut tries = 0;
    let ledger = loop {
        match Ledger::open(&path, seller_key) {
            Ok(l) => break l,
            Err(e) if tries >= 500 => panic!("the stopped seller's ledger stayed locked: {e}"),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let a = ledger
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!(a.deposits.to_string(), "102.500000");
    ledger.verify().unwrap();
}

/// The dashboard's page is served without the token (it holds no data) under a policy that
/// lets it talk to this origin only; its figures come from `/api/v1/earnings` and
/// `/api/v1/activity`, which need the token, refuse parameters out of range, and after a
/// purchase show the receipt's cost in the current bucket on both sides and the seller's
/// device busy with steps run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_and_its_figures() {
    let provider = TestNode::start(35, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(36, vec![provider.addr.clone()], None).await;
    provider.deposit_from(35, requester.key, 100);
    let buyer_api = start_api(&requester, 36).await;
    let seller_api = start_api(&provider, 35).await;
    let buyer = client(&buyer_api);
    let seller = client(&seller_api);

    // The page and its assets: no token needed, no data in them, this origin only.
    let mut s = tokio::net::TcpStream::connect(seller_api.addr())
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let page = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(page.starts_with("http/1.1 200"), "{page}");
    assert!(page.contains("content-type: text/html"), "{page}");
    assert!(
        page.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{page}"
    );
    assert!(page.contains("<script src=\"/dashboard.js\""), "{page}");
    for asset in ["/dashboard.js", "/dashboard.css"] {
        let (status, _) = raw(seller_api.addr(), &format!("GET {asset} HTTP/1.1"), b"").await;
        assert_eq!(status, 200, "{asset}");
    }
    // The data routes still need the token, and unknown paths are still behind it.
    for path in ["/api/v1/earnings", "/api/v1/activity", "/dashboard.json"] {
        let (status, body) = raw(seller_api.addr(), &format!("GET {path} HTTP/1.1"), b"").await;
        assert_eq!(status, 401, "{path}: {body}");
    }

    // Out of range or unknown parameters: one 400 naming the parameter.
    let auth = format!("Authorization: Bearer {}", seller_api.token());
    for (query, param) in [
        ("bucket_s=0", "bucket_s"),
        ("bucket_s=604801", "bucket_s"),
        ("buckets=0", "buckets"),
        ("buckets=289", "buckets"),
    ] {
        let (status, body) = raw(
            seller_api.addr(),
            &format!("GET /api/v1/earnings?{query} HTTP/1.1\r\n{auth}"),
            b"",
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
    let (status, body) = raw(
        seller_api.addr(),
        &format!("GET /api/v1/earnings?window=5 HTTP/1.1\r\n{auth}"),
        b"",
    )
    .await;
    assert_eq!(status, 400, "an unknown parameter: {body}");

    // Before any purchase: nothing earned, the device up and idle.
    let e = seller
        .call(Method::GET, "/api/v1/earnings?bucket_s=60&buckets=5", None)
        .await
        .unwrap();
    assert_eq!(e["earned"].as_array().unwrap().len(), 5);
    assert_eq!(e["earned_total"]["micro"], 0);
    let a = seller
        .call(Method::GET, "/api/v1/activity", None)
        .await
        .unwrap();
    assert_eq!(a["providing"], true);
    assert_eq!(a["devices"][0]["up"], true, "{a}");
    assert_eq!(a["devices"][0]["steps"], 0, "{a}");

    until("an advert", async || {
        let v = buyer.call(Method::GET, "/v1/models", None).await.unwrap();
        v["data"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    let v = buyer
        .call(
            Method::POST,
            "/v1/images/generations",
            Some(&json!({"prompt": "a chart", "size": "64x64", "num_inference_steps": 6})),
        )
        .await
        .unwrap();
    let cost = v["pixmarket"]["cost"]["micro"].as_u64().unwrap();
    assert!(cost > 0);

    let e = seller
        .call(Method::GET, "/api/v1/earnings?bucket_s=60&buckets=5", None)
        .await
        .unwrap();
    assert_eq!(e["earned"][4]["micro"], cost, "{e}");
    assert_eq!(e["earned_total"]["micro"], cost, "{e}");
    assert_eq!(e["spent_total"]["micro"], 0, "{e}");
    let e = buyer
        .call(Method::GET, "/api/v1/earnings?bucket_s=60&buckets=5", None)
        .await
        .unwrap();
    assert_eq!(e["spent"][4]["micro"], cost, "{e}");
    assert_eq!(e["earned_total"]["micro"], 0, "{e}");
    let a = until("the seller's completed job in its figures", async || {
        let a = seller
            .call(Method::GET, "/api/v1/activity", None)
            .await
            .unwrap();
        (a["jobs"]["completed"].as_u64() == Some(1)).then_some(a)
    })
    .await;
    let d = &a["devices"][0];
    assert!(d["steps"].as_u64().unwrap() >= 6, "{a}");
    assert!(d["mean_step_ms"].as_f64().unwrap() > 0.0, "{a}");
    assert!(d["busy_ms"].as_u64().is_some(), "{a}");
    let f = d["busy_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f), "{a}");
    let a = buyer
        .call(Method::GET, "/api/v1/activity", None)
        .await
        .unwrap();
    assert_eq!(a["providing"], false);
    assert_eq!(a["jobs"]["paid"], 1, "{a}");
    assert_eq!(a["devices"], json!([]), "{a}");

    buyer_api.shutdown().await;
    seller_api.shutdown().await;
    provider.node.shutdown().await;
    requester.node.shutdown().await;
}

/// A job paid for whose images miss the fetch deadline (the provider held them back, as a
/// slow or cut-off one would) is asked for once more by the API before it is reported
/// undelivered: the client gets its images, and the books charge it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_job_whose_images_come_late_still_completes_and_is_charged_once() {
    use pixmarket_tests::evil::{Cheat, EvilProvider};
    let evil = EvilProvider::start(37, Cheat::KeepImages, tiny_generator()).await;
    let requester = TestNode::start(38, vec![evil.addr.clone()], None).await;
    let mut settings = ApiSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        requester.dir.path().to_owned(),
    );
    settings.fetch_deadline = std::time::Duration::from_secs(2);
    let api = Api::start(
        &requester.node,
        pixmarket_protocol::SecretKey::from_seed(&[38; 32]),
        settings,
    )
    .await
    .unwrap();
    let buyer = client(&api);
    until("the provider's advert", async || {
        let v = buyer.call(Method::GET, "/v1/models", None).await.unwrap();
        v["data"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    let job = buyer
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(
                &json!({"prompt": "a late blue square", "size": "64x64", "num_inference_steps": 2}),
            ),
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();

    // Paid at the ack, and marked undelivered at the deadline; the job is not failed yet.
    let books = requester.node.ledger();
    let market_job = until("the undelivered mark", async || {
        books
            .receipts(Some(&evil.key))
            .unwrap()
            .iter()
            .find(|r| r.undelivered.is_some())
            .and_then(|r| r.receipt.verify().ok())
            .map(|r| r.job_id)
    })
    .await;
    let status = buyer
        .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
        .await
        .unwrap();
    assert_ne!(status["status"], "failed", "{status}");

    evil.hand_over_images();
    let done = until("the job completed", async || {
        let v = buyer
            .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
            .await
            .unwrap();
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "completed").then_some(v)
    })
    .await;
    let stored = books.receipts(Some(&evil.key)).unwrap();
    assert_eq!(stored.len(), 1, "one job, one receipt");
    assert_eq!(stored[0].undelivered, None, "delivered late");
    assert_eq!(
        done["result"]["receipt"],
        stored[0].receipt.digest().to_string()
    );
    let receipt = stored[0].receipt.verify().unwrap();
    assert_eq!(receipt.job_id, market_job);
    let account = books.account(Role::Requester, &evil.key).unwrap().unwrap();
    assert_eq!(account.charged, receipt.cost, "charged once");
    let url = done["images"][0]["url"].as_str().unwrap().to_owned();
    assert!(url.contains(&id), "{url}");

    api.shutdown().await;
    requester.node.shutdown().await;
    evil.shutdown().await;
}
