//! `wuerstchen serve` over a real loopback socket: predictions, webhooks, cancel, a
//! bounded load test, and a shutdown with a prediction in flight. The model is the
//! tiny random-weight parity pipeline of the fixtures (fast; noise pictures).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::spawn_server;
use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let (child, port) = spawn_server(extra);
        let s = Self { child, port };
        s.wait_health("READY");
        s
    }

    fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
        http(self.port, method, path, headers, body)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.http("POST", path, &[], &body.to_string())
    }

    fn wait_health(&self, wanted: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((200, h)) = common::http(self.port, "GET", "/health-check", &[], "") {
                if h["status"] == wanted {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("health never {wanted}");
    }

    /// The exit status, once the process ends within `within` (else fails with `what`).
    fn wait_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_status(&self, id: &str, done: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let (_, p) = self.http("GET", &format!("/predictions/{id}"), &[], "");
            if done(p["status"].as_str().unwrap_or("")) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("prediction {id} never got there");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    common::http(port, method, path, headers, body).unwrap()
}

fn quick(seed: u64) -> Value {
    json!({"prompt": format!("shape {seed}"), "width": 128, "height": 128, "seed": seed,
           "prior_num_inference_steps": 2, "decoder_num_inference_steps": 2})
}

fn terminal(s: &str) -> bool {
    matches!(s, "succeeded" | "failed" | "canceled")
}

/// A loopback webhook receiver: every JSON body POSTed to it arrives on the channel.
fn webhook_receiver() -> (String, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            if tx.send(serde_json::from_slice(&body).unwrap()).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

#[test]
fn predictions_webhooks_and_cancel_over_a_socket() {
    let server = Server::start(&[]);
    let (code, p) = server.post("/predictions", json!({"input": quick(1)}));
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["status"], "succeeded");
    assert!(p["output"][0]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));

    // async with a webhook: the final object arrives on the receiver
    let (url, events) = webhook_receiver();
    let (code, p) = server.http(
        "POST",
        "/predictions",
        &[("Prefer", "respond-async")],
        &json!({"input": quick(2), "webhook": url}).to_string(),
    );
    assert_eq!(code, 202, "{p}");
    let last = loop {
        let e = events
            .recv_timeout(Duration::from_secs(60))
            .expect("webhook event");
        if terminal(e["status"].as_str().unwrap()) {
            break e;
        }
    };
    assert_eq!(
        (last["id"].clone(), last["status"].clone()),
        (p["id"].clone(), json!("succeeded"))
    );

    // cancel mid-run
    let slow = json!({"input": {"prompt": "slow", "prior_num_inference_steps": 1000}});
    let (code, p) = server.http(
        "POST",
        "/predictions",
        &[("Prefer", "respond-async")],
        &slow.to_string(),
    );
    assert_eq!(code, 202);
    let id = p["id"].as_str().unwrap();
    server.wait_status(id, |s| s == "processing");
    let (code, _) = server.post(&format!("/predictions/{id}/cancel"), json!({}));
    assert_eq!(code, 200);
    assert_eq!(server.wait_status(id, terminal)["status"], "canceled");
    server.wait_health("READY");
}

#[test]
fn bounded_load_keeps_every_answer_whole_and_right() {
    let server = Server::start(&["--queue", "2"]);
    // each seed's image generated alone first
    let seeds: Vec<u64> = (100..140).collect();
    let alone: Vec<Value> = seeds
        .iter()
        .map(|&s| server.post("/predictions", json!({"input": quick(s)})).1["output"][0].clone())
        .collect();
    // 40 requests from 8 threads at once: succeeded, or refused with 409, never mixed up
    let port = server.port;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let seeds = seeds.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|k| {
                        let i = t * 5 + k;
                        let body = json!({"input": quick(seeds[i])}).to_string();
                        (i, http(port, "POST", "/predictions", &[], &body))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        for (i, (code, p)) in h.join().unwrap() {
            match code {
                200 => {
                    assert_eq!(p["status"], "succeeded", "{p}");
                    assert!(
                        p["output"][0] == alone[i],
                        "request {i} got another request's image"
                    );
                    ok += 1;
                }
                409 => busy += 1,
                other => panic!("request {i}: HTTP {other}: {p}"),
            }
        }
    }
    println!("load: {ok} succeeded, {busy} refused busy");
    assert_eq!(ok + busy, 40);
    assert!(ok >= 3, "the queue admitted too little: {ok}");
    server.wait_health("READY");
    let (_, metrics) = server.http("GET", "/metrics", &[], "");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!("outcome=\"succeeded\"}} {}", 40 + ok)),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("outcome=\"rejected\"}} {busy}")),
        "{metrics}"
    );
}

#[test]
fn shutdown_finishes_the_prediction_in_flight() {
    let mut server = Server::start(&[]);
    let (url, events) = webhook_receiver();
    let body = json!({"input": {"prompt": "last", "width": 128, "height": 128, "seed": 3,
                                "prior_num_inference_steps": 300},
                      "webhook": url, "webhook_events_filter": ["completed"]});
    let (code, p) = server.http(
        "POST",
        "/predictions",
        &[("Prefer", "respond-async")],
        &body.to_string(),
    );
    assert_eq!(code, 202);
    server.wait_status(p["id"].as_str().unwrap(), |s| s == "processing");
    let (code, body) = server.post("/shutdown", json!({}));
    assert_eq!((code, body), (200, json!({})));
    // the process exits cleanly, and only after delivering the final webhook
    let status = server.wait_exit(Duration::from_secs(120), "the server did not exit");
    assert!(status.success(), "{status}");
    let last = events
        .recv_timeout(Duration::from_secs(1))
        .expect("the final webhook before exit");
    assert_eq!(
        (last["id"].clone(), last["status"].clone()),
        (p["id"].clone(), json!("succeeded"))
    );
    assert!(last["output"][0]
        .as_str()
        .unwrap()
        .starts_with("data:image/png"));
}

#[test]
fn a_sync_client_that_hangs_up_cancels_its_prediction_and_sigterm_stops_cleanly() {
    let mut server = Server::start(&[]);
    // a slow synchronous request with a known id, abandoned mid-run
    let body =
        json!({"id": "abandoned", "input": {"prompt": "slow", "prior_num_inference_steps": 1000}})
            .to_string();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        conn,
        "POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    server.wait_status("abandoned", |s| s == "processing");
    drop(conn);
    assert_eq!(
        server.wait_status("abandoned", terminal)["status"],
        "canceled"
    );
    server.wait_health("READY");

    // SIGTERM: the same graceful path as POST /shutdown
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.wait_exit(Duration::from_secs(30), "the server ignored SIGTERM");
    assert!(status.success(), "{status}");
}
