//! The HTTP surface in-process: every route and status code, Cog's bodies, webhooks.
//! The model is the tiny random-weight parity pipeline of the fixtures (fast; its
//! pictures are noise, which is all these tests need).

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use tower::ServiceExt;
use wuerstchen_server::worker::ModelSpec;
use wuerstchen_server::{router, AppState, Workers};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline")
}

fn spec() -> ModelSpec {
    ModelSpec {
        prior: fixtures().join("prior"),
        decoder: fixtures().join("decoder"),
        device: Device::Cpu,
        dtype: DType::F32,
    }
}

/// A quick request: 128 px, two steps per stage.
fn quick(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "width": 128, "height": 128, "seed": seed,
           "prior_num_inference_steps": 2, "decoder_num_inference_steps": 2})
}

/// A request that runs until canceled (1000 prior steps at 1024 px).
fn slow() -> Value {
    json!({"prompt": "slow", "width": 1024, "height": 1024, "prior_num_inference_steps": 1000})
}

struct App {
    router: Router,
    state: AppState,
    workers: Option<Workers>,
}

impl App {
    async fn start(spec: ModelSpec, queue: usize) -> Self {
        let (state, workers) = AppState::start(spec, queue);
        let app = Self {
            router: router(state.clone()),
            state,
            workers: Some(workers),
        };
        app.wait_health(&["READY", "SETUP_FAILED"]).await;
        app
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, &[], Body::empty()).await
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            uri,
            &[("content-type", "application/json")],
            Body::from(body.to_string()),
        )
        .await
    }

    async fn post_async(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            uri,
            &[
                ("content-type", "application/json"),
                ("prefer", "respond-async"),
            ],
            Body::from(body.to_string()),
        )
        .await
    }

    async fn wait_health(&self, wanted: &[&str]) -> String {
        for _ in 0..600 {
            let (_, h) = self.get("/health-check").await;
            let s = h["status"].as_str().unwrap().to_string();
            if wanted.contains(&s.as_str()) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("health never reached {wanted:?}");
    }

    /// Polls a prediction until `done(status)`.
    async fn wait_for(&self, id: &str, done: impl Fn(&str) -> bool) -> Value {
        for _ in 0..3000 {
            let (code, p) = self.get(&format!("/predictions/{id}")).await;
            assert_eq!(code, StatusCode::OK, "{p}");
            if done(p["status"].as_str().unwrap()) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("prediction {id} never got there");
    }

    async fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            w.finish(&self.state.shared).await;
        }
    }
}

fn terminal(s: &str) -> bool {
    matches!(s, "succeeded" | "failed" | "canceled")
}

/// The PNG inside a data URL: (width, height, parameters text).
fn decode_output(url: &str) -> (u32, u32, String) {
    let b64 = url
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let path = std::env::temp_dir().join(format!("wuerstchen-router-{}.png", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let png = wuerstchen::image_io::read_png(&path).unwrap();
    let text = wuerstchen::image_io::read_parameters(&path)
        .unwrap()
        .unwrap_or_default();
    std::fs::remove_file(&path).unwrap();
    (png.image.width as u32, png.image.height as u32, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_page_health_openapi_and_metrics() {
    let app = App::start(spec(), 0).await;
    let (code, root) = app.get("/").await;
    assert_eq!(code, StatusCode::OK);
    for key in [
        "cog_version",
        "healthcheck_url",
        "openapi_url",
        "predictions_url",
        "predictions_idempotent_url",
        "predictions_cancel_url",
        "shutdown_url",
    ] {
        assert!(root.get(key).is_some(), "{key} missing from {root}");
    }
    // a browser gets the page
    let (code, page) = app
        .call(
            "GET",
            "/",
            &[("accept", "text/html,application/xhtml+xml")],
            Body::empty(),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let page = page.as_str().unwrap();
    assert!(
        page.contains("<form") && page.contains("respond-async"),
        "{page}"
    );

    let (code, h) = app.get("/health-check").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(h["status"], "READY");
    assert_eq!(h["setup"]["status"], "succeeded");

    let (_, doc) = app.get("/openapi.json").await;
    let input = &doc["components"]["schemas"]["Input"]["properties"];
    for name in [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_images_per_prompt",
        "prior_num_inference_steps",
        "prior_guidance_scale",
        "decoder_num_inference_steps",
        "decoder_guidance_scale",
        "seed",
    ] {
        assert!(input.get(name).is_some(), "{name} missing from the schema");
    }
    // the fixture model declares no size: the official default
    assert_eq!(input["width"]["default"], 1024);
    assert!(doc["components"]["schemas"]["Output"].is_object());

    let (code, _) = app.get("/predictions/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = app
        .post("/predictions", json!({"input": {"prompt": ""}}))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let (code, metrics) = app.get("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("wuerstchen_predictions_total{outcome=\"invalid\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("wuerstchen_queue_depth 0"), "{metrics}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_prediction_returns_pngs_and_metrics() {
    let app = App::start(spec(), 0).await;
    let mut input = quick("a red circle", 5);
    input["num_images_per_prompt"] = json!(2);
    let mut with_unknown = input.clone();
    with_unknown["unknown_field"] = json!("dropped");
    let (code, p) = app
        .post("/predictions", json!({"input": with_unknown}))
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    let out = p["output"].as_array().unwrap();
    assert_eq!(out.len(), 2);
    let (w, h, text) = decode_output(out[0].as_str().unwrap());
    assert_eq!((w, h), (128, 128));
    assert!(
        text.starts_with("a red circle\n") && text.contains("Seed: 5"),
        "{text}"
    );
    assert!(p["metrics"]["predict_time"].as_f64().unwrap() > 0.0);
    assert!(p["logs"].as_str().unwrap().contains("seed 5"));
    assert_eq!(p["id"].as_str().unwrap().len(), 26);
    // the same seed again gives the same image
    let (_, again) = app.post("/predictions", json!({"input": input})).await;
    assert!(
        again["output"][1] == out[1],
        "the same seed drew another image"
    );
    // without a seed one is drawn and reported
    let mut unseeded = quick("x", 0);
    unseeded.as_object_mut().unwrap().remove("seed");
    let (_, p) = app.post("/predictions", json!({"input": unseeded})).await;
    let logs = p["logs"].as_str().unwrap();
    let seed = logs
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .expect("seed in logs");
    let (_, _, text) = decode_output(p["output"][0].as_str().unwrap());
    assert!(text.contains(&format!("Seed: {seed}")), "{text}");
    let (_, metrics) = app.get("/metrics").await;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("outcome=\"succeeded\"} 3"));
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("wuerstchen_stage_seconds_count{stage=\"decoder\"} 3"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_cogs_error_bodies() {
    let app = App::start(spec(), 0).await;
    let field_error = |body: &Value, field: &str| -> String {
        body["detail"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["loc"] == json!(["body", "input", field]))
            .unwrap_or_else(|| panic!("no error for {field} in {body}"))["msg"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let cases = [
        (
            json!({"prompt": "x", "width": "wide"}),
            "width",
            "value is not a valid integer",
        ),
        (
            json!({"prompt": "x", "height": 1000}),
            "height",
            "1000 is not a multiple of 128 (try 896)",
        ),
        (
            json!({"prompt": "x", "num_images_per_prompt": 5}),
            "num_images_per_prompt",
            "5 is greater than the maximum of 4",
        ),
        (
            json!({"prompt": "x", "decoder_num_inference_steps": 0}),
            "decoder_num_inference_steps",
            "0 is less than the minimum of 1",
        ),
        (
            json!({"prompt": "x", "prior_guidance_scale": "high"}),
            "prior_guidance_scale",
            "value is not a valid number",
        ),
        (json!({"prompt": 3}), "prompt", "str type expected"),
        (json!({}), "prompt", "field required"),
    ];
    for (input, field, msg) in cases {
        let (code, body) = app.post("/predictions", json!({"input": input})).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(field_error(&body, field), msg);
        assert!(!body["detail"][0]["type"].as_str().unwrap().is_empty());
    }
    // every bad field is listed at once
    let (_, body) = app
        .post(
            "/predictions",
            json!({"input": {"prompt": "x", "width": 1, "height": "h", "seed": -1}}),
        )
        .await;
    assert_eq!(body["detail"].as_array().unwrap().len(), 3, "{body}");
    // not an object: 422; not JSON: 400; too big: 413
    let (code, _) = app.post("/predictions", json!([1, 2])).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let (code, _) = app
        .call(
            "POST",
            "/predictions",
            &[("content-type", "application/json")],
            Body::from("{\"input\": "),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let huge = json!({"input": {"prompt": "x".repeat(wuerstchen_server::MAX_BODY_BYTES)}});
    let (code, _) = app.post("/predictions", huge).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    let (code, body) = app
        .post(
            "/predictions",
            json!({"input": quick("x", 1), "webhook_events_filter": ["start", "bogus"]}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["body", "webhook_events_filter", 1])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_cancel_and_idempotent_put() {
    let app = App::start(spec(), 0).await;
    // async: 202 with the id and "starting"
    let (code, p) = app
        .post_async("/predictions", json!({"input": slow()}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{p}");
    assert_eq!(p["status"], "starting");
    let id = p["id"].as_str().unwrap().to_string();
    let running = app.wait_for(&id, |s| s == "processing").await;
    assert_eq!(app.wait_health(&["BUSY"]).await, "BUSY");
    // progress shows while it runs
    let mut progressed = running;
    for _ in 0..500 {
        if progressed["progress"]["step"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        progressed = app.get(&format!("/predictions/{id}")).await.1;
    }
    assert_eq!(progressed["progress"]["stage"], "prior", "{progressed}");
    assert_eq!(progressed["progress"]["total"], 1000);
    // one slot: a valid request is refused with 409, an invalid one still gets 422
    let (code, body) = app
        .post("/predictions", json!({"input": quick("y", 1)}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(
        body,
        json!({"error": "At capacity - all prediction slots busy", "status": "failed"})
    );
    let (code, _) = app
        .post(
            "/predictions",
            json!({"input": {"prompt": "y", "width": 7}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    // cancel: 200 {}, the prediction ends canceled, the slot frees
    let (code, body) = app
        .post(&format!("/predictions/{id}/cancel"), json!({}))
        .await;
    assert_eq!((code, body), (StatusCode::OK, json!({})));
    let done = app.wait_for(&id, terminal).await;
    assert_eq!(done["status"], "canceled", "{done}");
    assert!(done["output"].is_null());
    let (code, body) = app
        .post(&format!("/predictions/{id}/cancel"), json!({}))
        .await;
    assert_eq!((code, body), (StatusCode::NOT_FOUND, json!({})));
    let (code, _) = app.post("/predictions/unknown/cancel", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    app.wait_health(&["READY"]).await;

    // PUT with an id: created once; asking again while it runs is 202 with its state
    let body = json!({"input": quick("put", 9)}).to_string();
    let put = |b: String| {
        app.call(
            "PUT",
            "/predictions/my-id",
            &[
                ("content-type", "application/json"),
                ("prefer", "respond-async"),
            ],
            Body::from(b),
        )
    };
    let (code, first) = put(body.clone()).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(first["id"], "my-id");
    let (code, second) = put(body.clone()).await;
    assert!(
        code == StatusCode::ACCEPTED || code == StatusCode::OK,
        "{code}"
    );
    assert_eq!(second["id"], "my-id");
    let done = app.wait_for("my-id", terminal).await;
    assert_eq!(done["status"], "succeeded");
    let (code, third) = put(body).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(third["output"], done["output"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_queue_admits_then_refuses() {
    let app = App::start(spec(), 1).await;
    let (code, a) = app
        .post_async("/predictions", json!({"input": slow()}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let (code, b) = app
        .post_async("/predictions", json!({"input": quick("queued", 2)}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{b}");
    let (code, _) = app
        .post_async("/predictions", json!({"input": quick("third", 3)}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    let (_, metrics) = app.get("/metrics").await;
    assert!(metrics.as_str().unwrap().contains("wuerstchen_capacity 2"));
    let a = a["id"].as_str().unwrap();
    app.post(&format!("/predictions/{a}/cancel"), json!({}))
        .await;
    let b = app.wait_for(b["id"].as_str().unwrap(), terminal).await;
    assert_eq!(b["status"], "succeeded");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failure_is_reported_and_predictions_get_503() {
    let mut bad = spec();
    bad.prior = PathBuf::from("/no/such/prior");
    let app = App::start(bad, 0).await;
    let (_, h) = app.get("/health-check").await;
    assert_eq!(h["status"], "SETUP_FAILED");
    assert!(
        h["setup"]["logs"]
            .as_str()
            .unwrap()
            .contains("/no/such/prior"),
        "{h}"
    );
    let (code, body) = app
        .post("/predictions", json!({"input": quick("x", 1)}))
        .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "failed");
    app.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        // following links: the fixture's tokenizer/ links to the shared one
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The setup loads every model: damaged weights fail it, naming the file, instead of
/// failing the first prediction that reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_weights_fail_the_setup() {
    let dir = std::env::temp_dir().join(format!("wuerstchen-damaged-{}", std::process::id()));
    copy_dir(&fixtures().join("decoder"), &dir);
    let vqgan = dir.join("vqgan/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vqgan).unwrap();
    std::fs::write(&vqgan, &bytes[..bytes.len() / 2]).unwrap();
    let mut bad = spec();
    bad.decoder = dir.clone();
    let app = App::start(bad, 0).await;
    let (_, h) = app.get("/health-check").await;
    assert_eq!(h["status"], "SETUP_FAILED", "{h}");
    let logs = h["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("diffusion_pytorch_model.safetensors"),
        "{logs}"
    );
    app.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Collects the JSON bodies POSTed to a loopback listener.
async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            // read the head, then Content-Length bytes of body
            let body = loop {
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                }
                assert!(n > 0, "connection closed early");
            };
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            tx.send(serde_json::from_slice(&body).unwrap()).unwrap();
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_follow_the_prediction_and_honour_the_filter() {
    let app = App::start(spec(), 0).await;
    let (url, mut rx) = webhook_receiver().await;
    let (code, p) = app
        .post_async(
            "/predictions",
            json!({"input": quick("hook", 4), "webhook": url}),
        )
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let mut events = Vec::new();
    while events
        .last()
        .is_none_or(|e: &Value| !terminal(e["status"].as_str().unwrap()))
    {
        let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e["id"], p["id"]);
        events.push(e);
    }
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "processing", "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), "succeeded");
    assert!(
        events
            .iter()
            .any(|e| e["status"] == "processing" && e["output"].is_array()),
        "no output event"
    );
    assert!(events.last().unwrap()["output"][0]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));

    // only the final event when asked
    let (_, p) = app
        .post_async(
            "/predictions",
            json!({"input": quick("hook2", 5), "webhook": url,
                                            "webhook_events_filter": ["completed"]}),
        )
        .await;
    let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e["id"].clone(), e["status"].clone()),
        (p["id"].clone(), json!("succeeded"))
    );
    app.wait_for(p["id"].as_str().unwrap(), terminal).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rx.try_recv().is_err(),
        "an event the filter excludes was sent"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_and_triggers() {
    let app = App::start(spec(), 0).await;
    let notified = app.state.shutdown.clone();
    let waiter = tokio::spawn(async move { notified.notified().await });
    let (code, body) = app.post("/shutdown", json!({})).await;
    assert_eq!((code, body), (StatusCode::OK, json!({})));
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    app.stop().await;
}
