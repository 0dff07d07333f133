//! A prediction server for Würstchen that speaks Replicate's Cog HTTP API (see
//! `docs/server.md`), plus a small web page. `router(state)` is the whole HTTP surface,
//! so tests drive it in-process; `serve` adds the socket, the model worker thread,
//! webhook delivery and graceful shutdown.

pub mod metrics;
pub mod prediction;
pub mod schema;
pub mod webhook;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Notify;
use wuerstchen::pipeline::GenerationParams;

use metrics::Outcome;
use prediction::{Event, Prediction, Status};
use worker::{ModelSpec, SetupStatus, Shared};

/// Largest request body accepted (a prompt and a few numbers need far less).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

const PAGE: &str = include_str!("page.html");

/// What the handlers share: the worker's state and the shutdown trigger.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub shutdown: Arc<Notify>,
}

impl AppState {
    /// State with a running model worker thread and webhook task (needs a tokio
    /// runtime). `queue`: predictions that may wait behind the running one.
    pub fn start(spec: ModelSpec, queue: usize) -> (Self, Workers) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Shared::new(queue, tx);
        let webhooks = tokio::spawn(webhook::deliver(rx));
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("model-worker".into())
                .spawn(move || worker::run(shared, spec))
                .expect("spawning the model worker thread")
        };
        (
            Self {
                shared,
                shutdown: Arc::new(Notify::new()),
            },
            Workers { worker, webhooks },
        )
    }
}

/// The model thread and the webhook task behind an `AppState`.
pub struct Workers {
    worker: std::thread::JoinHandle<()>,
    webhooks: tokio::task::JoinHandle<()>,
}

impl Workers {
    /// Lets the worker finish the running and queued predictions, then delivers the
    /// last webhooks, and returns.
    pub async fn finish(self, shared: &Shared) {
        shared.stop();
        let worker = self.worker;
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        shared.close_webhooks();
        let _ = self.webhooks.await;
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health-check", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/predictions", post(create))
        .route("/predictions/{id}", get(show).put(create_idempotent))
        .route("/predictions/{id}/cancel", post(cancel))
        .route("/shutdown", post(shutdown))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `POST /shutdown`, SIGTERM or Ctrl-C; then lets the running and queued
/// predictions finish and their webhooks go out before returning.
pub async fn serve(addr: SocketAddr, spec: ModelSpec, queue: usize) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let (state, workers) = AppState::start(spec, queue);
    let shared = state.shared.clone();
    let trigger = state.shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = trigger.notified() => {}
                _ = terminate_signal() => {}
            }
            eprintln!("shutting down: finishing running predictions");
        })
        .await?;
    workers.finish(&shared).await;
    Ok(())
}

async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Every error answer of this server, mapped to its status code in one place.
enum ApiError {
    /// 400: the body is not JSON
    Malformed(String),
    /// 422: Cog's validation `detail` list
    Invalid(Vec<Value>),
    /// 409: every slot busy
    AtCapacity,
    /// 503: the model is not (or could not be) set up
    NotReady(String),
    /// 404 `{}`
    NotFound,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, body) = match self {
            ApiError::Malformed(m) => (
                StatusCode::BAD_REQUEST,
                json!({"detail": [{"loc": ["body"], "msg": m, "type": "value_error.jsondecode"}]}),
            ),
            ApiError::Invalid(detail) => {
                (StatusCode::UNPROCESSABLE_ENTITY, json!({"detail": detail}))
            }
            ApiError::AtCapacity => (
                StatusCode::CONFLICT,
                json!({"error": "At capacity - all prediction slots busy", "status": "failed"}),
            ),
            ApiError::NotReady(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": m, "status": "failed"}),
            ),
            ApiError::NotFound => (StatusCode::NOT_FOUND, json!({})),
        };
        (code, Json(body)).into_response()
    }
}

async fn root(headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        return Html(PAGE).into_response();
    }
    Json(json!({
        "cog_version": "0.23.1",
        "docs_url": "/docs",
        "healthcheck_url": "/health-check",
        "openapi_url": "/openapi.json",
        "predictions_url": "/predictions",
        "predictions_idempotent_url": "/predictions/{prediction_id}",
        "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
        "shutdown_url": "/shutdown",
    }))
    .into_response()
}

async fn health(State(st): State<AppState>) -> Json<Value> {
    let setup = st.shared.setup();
    let status = match setup.status {
        SetupStatus::Starting => "STARTING",
        SetupStatus::Failed => "SETUP_FAILED",
        SetupStatus::Succeeded if st.shared.busy() => "BUSY",
        SetupStatus::Succeeded => "READY",
    };
    Json(json!({
        "status": status,
        "setup": {
            "started_at": setup.started_at,
            "completed_at": setup.completed_at,
            "status": match setup.status {
                SetupStatus::Starting => "starting",
                SetupStatus::Succeeded => "succeeded",
                SetupStatus::Failed => "failed",
            },
            "logs": setup.logs,
        },
        "version": {"wuerstchen": env!("CARGO_PKG_VERSION"), "model": setup.model},
    }))
}

async fn openapi(State(st): State<AppState>) -> Json<Value> {
    Json(schema::openapi(&st.shared.setup().defaults))
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let (running, waiting) = st.shared.load();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.shared
            .metrics
            .render(running, waiting, st.shared.capacity),
    )
}

async fn show(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.shared.get(&id) {
        Some(p) => Json(p.to_json()).into_response(),
        None => ApiError::NotFound.into_response(),
    }
}

async fn cancel(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    if st.shared.cancel(&id) {
        Json(json!({})).into_response()
    } else {
        ApiError::NotFound.into_response()
    }
}

async fn shutdown(State(st): State<AppState>) -> Json<Value> {
    st.shutdown.notify_one();
    Json(json!({}))
}

async fn create(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    run_request(st, headers, body, None).await
}

async fn create_idempotent(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_request(st, headers, body, Some(id)).await
}

/// A parsed prediction request.
struct Request {
    id: Option<String>,
    input: Value,
    params: wuerstchen::pipeline::GenerationParams,
    webhook: Option<String>,
    events: Vec<Event>,
}

fn parse_request(body: &[u8], defaults: &GenerationParams) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("Expecting value: {e}")))?;
    let Value::Object(obj) = &v else {
        return Err(ApiError::Invalid(vec![json!({"loc": ["body"],
            "msg": "value is not a valid dict", "type": "type_error.dict"})]));
    };
    let input = obj.get("input").cloned().unwrap_or(json!({}));
    let mut detail: Vec<Value> = Vec::new();
    let params = match schema::parse_input(&input, defaults) {
        Ok(p) => Some(p),
        Err(errs) => {
            detail.extend(errs.iter().map(schema::FieldError::to_json));
            None
        }
    };
    let string_field = |name: &str, detail: &mut Vec<Value>| match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            detail.push(json!({"loc": ["body", name], "msg": "str type expected",
                "type": "type_error.str"}));
            None
        }
    };
    let id = string_field("id", &mut detail);
    let webhook = string_field("webhook", &mut detail);
    let all = vec![Event::Start, Event::Output, Event::Logs, Event::Completed];
    let events = match obj.get("webhook_events_filter") {
        None | Some(Value::Null) => all,
        Some(Value::Array(items)) => {
            let mut events = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().and_then(Event::parse) {
                    Some(e) => events.push(e),
                    None => detail.push(json!({"loc": ["body", "webhook_events_filter", i],
                        "msg": "value is not a valid enumeration member; permitted: \
                                'start', 'output', 'logs', 'completed'",
                        "type": "type_error.enum"})),
                }
            }
            events
        }
        Some(_) => {
            detail.push(json!({"loc": ["body", "webhook_events_filter"],
                "msg": "value is not a valid list", "type": "type_error.list"}));
            all
        }
    };
    match params {
        Some(params) if detail.is_empty() => Ok(Request {
            id,
            input,
            params,
            webhook,
            events,
        }),
        _ => Err(ApiError::Invalid(detail)),
    }
}

/// Cancels a synchronous prediction whose client went away before it finished.
struct CancelOnDrop(Arc<Shared>, Arc<Prediction>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.1.status().is_terminal() {
            self.0.cancel(&self.1.id);
        }
    }
}

async fn run_request(
    st: AppState,
    headers: HeaderMap,
    body: Bytes,
    path_id: Option<String>,
) -> Response {
    let shared = st.shared.clone();
    let setup = shared.setup();
    let answer = match setup.status {
        SetupStatus::Succeeded => Ok(()),
        SetupStatus::Starting => Err(ApiError::NotReady(
            "Setup has not finished yet: the model is loading".into(),
        )),
        SetupStatus::Failed => Err(ApiError::NotReady(format!(
            "Setup failed: {}",
            setup.logs.trim()
        ))),
    }
    .and_then(|()| parse_request(&body, &setup.defaults));
    let req = match answer {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.outcome(match e {
                ApiError::NotReady(_) => Outcome::Unavailable,
                _ => Outcome::Invalid,
            });
            return e.into_response();
        }
    };
    let respond_async = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "respond-async");
    let id = path_id.or(req.id).unwrap_or_else(prediction::new_id);
    // the same id again: its state, not a second run (idempotent PUT)
    if let Some(existing) = shared.get(&id) {
        let code = if existing.status().is_terminal() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return (code, Json(existing.to_json())).into_response();
    }
    let p = Arc::new(Prediction::new(
        id,
        req.input,
        req.params,
        req.webhook,
        req.events,
    ));
    // the object as admitted ("starting"), before the worker can move it on
    let admitted = p.to_json();
    if shared.enqueue(p.clone()).is_err() {
        shared.metrics.outcome(Outcome::Rejected);
        return ApiError::AtCapacity.into_response();
    }
    if respond_async {
        return (StatusCode::ACCEPTED, Json(admitted)).into_response();
    }
    let guard = CancelOnDrop(shared, p.clone());
    let mut changed = p.changed.subscribe();
    while !p.status().is_terminal() {
        if changed.changed().await.is_err() {
            break;
        }
    }
    drop(guard);
    debug_assert!(p.status() != Status::Starting);
    Json(p.to_json()).into_response()
}
