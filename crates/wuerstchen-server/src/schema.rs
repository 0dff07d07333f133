//! The model's inputs: one table that both the validator and `/openapi.json` read, so
//! the schema a client sees is the one the server enforces. Names and meanings are the
//! Replicate model's; each maps onto a field of the library's `GenerationParams`.

use serde_json::{json, Map, Value};
use wuerstchen::pipeline::{GenerationParams, MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_MULTIPLE};

/// Most images one request may ask for (the Replicate model's limit).
pub const MAX_IMAGES_PER_PROMPT: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    String,
    Integer,
    Number,
}

impl Kind {
    fn openapi_type(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Integer => "integer",
            Kind::Number => "number",
        }
    }
}

/// One input field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub description: &'static str,
    /// None: no default (required, or absent means "chosen at run time")
    pub default: Option<Value>,
    pub required: bool,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    /// sizes: the value must be a multiple of this
    pub multiple_of: Option<usize>,
}

/// The input table, in Cog's `x-order`. `d` holds the model's defaults (its own size
/// and prior guidance).
pub fn fields(d: &GenerationParams) -> Vec<Field> {
    let f =
        |name, kind, description, default: Option<Value>, min: Option<f64>, max: Option<f64>| {
            Field {
                name,
                kind,
                description,
                default,
                required: false,
                minimum: min,
                maximum: max,
                multiple_of: None,
            }
        };
    let size = |name, description, default: usize| Field {
        multiple_of: Some(SIZE_MULTIPLE),
        ..f(
            name,
            Kind::Integer,
            description,
            Some(json!(default)),
            Some(MIN_SIZE as f64),
            Some(MAX_SIZE as f64),
        )
    };
    let steps = Some(MAX_STEPS as f64);
    vec![
        Field {
            required: true,
            ..f(
                "prompt",
                Kind::String,
                "What the image shows",
                None,
                None,
                None,
            )
        },
        f(
            "negative_prompt",
            Kind::String,
            "What it should not show (used where guidance is on)",
            Some(json!("")),
            None,
            None,
        ),
        size("width", "Image width in pixels, a multiple of 128", d.width),
        size(
            "height",
            "Image height in pixels, a multiple of 128",
            d.height,
        ),
        f(
            "num_images_per_prompt",
            Kind::Integer,
            "Number of images",
            Some(json!(1)),
            Some(1.0),
            Some(MAX_IMAGES_PER_PROMPT as f64),
        ),
        f(
            "prior_num_inference_steps",
            Kind::Integer,
            "Stage C steps; leave out for the 29-call default schedule",
            None,
            Some(1.0),
            steps,
        ),
        f(
            "prior_guidance_scale",
            Kind::Number,
            "Classifier-free guidance of Stage C (on above 1)",
            Some(json!(d.prior_guidance)),
            Some(0.0),
            Some(20.0),
        ),
        f(
            "decoder_num_inference_steps",
            Kind::Integer,
            "Stage B steps",
            Some(json!(d.decoder_steps)),
            Some(1.0),
            steps,
        ),
        f(
            "decoder_guidance_scale",
            Kind::Number,
            "Classifier-free guidance of Stage B (on above 1)",
            Some(json!(d.decoder_guidance)),
            Some(0.0),
            Some(20.0),
        ),
        f(
            "seed",
            Kind::Integer,
            "Random seed; leave out for a random one (reported in the logs and the PNG)",
            None,
            Some(0.0),
            Some(u64::MAX as f64),
        ),
    ]
}

/// One entry of Cog's 422 `detail` list.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub msg: String,
    pub kind: &'static str,
}

impl FieldError {
    pub fn to_json(&self) -> Value {
        json!({"loc": ["body", "input", self.field], "msg": self.msg, "type": self.kind})
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Checks one value against its field; returns it normalised.
fn check(field: &Field, v: &Value) -> Result<Value, FieldError> {
    let err = |msg: String, kind: &'static str| FieldError {
        field: field.name.to_string(),
        msg,
        kind,
    };
    let num = match (field.kind, v) {
        (Kind::String, Value::String(s)) => return Ok(Value::String(s.clone())),
        (Kind::String, _) => return Err(err("str type expected".into(), "type_error.str")),
        // integers: JSON integers, or floats with no fractional part (1024.0)
        (Kind::Integer, Value::Number(n)) => match n.as_u64() {
            Some(u) => u as f64,
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 => f,
                _ => {
                    return Err(err(
                        "value is not a valid integer".into(),
                        "type_error.integer",
                    ))
                }
            },
        },
        (Kind::Integer, _) => {
            return Err(err(
                "value is not a valid integer".into(),
                "type_error.integer",
            ))
        }
        (Kind::Number, Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        (Kind::Number, _) => {
            return Err(err(
                "value is not a valid number".into(),
                "type_error.float",
            ))
        }
    };
    if let Some(min) = field.minimum {
        if num < min {
            return Err(err(
                format!(
                    "{} is less than the minimum of {}",
                    fmt_num(num),
                    fmt_num(min)
                ),
                "value_error",
            ));
        }
    }
    if let Some(max) = field.maximum {
        if num > max {
            return Err(err(
                format!(
                    "{} is greater than the maximum of {}",
                    fmt_num(num),
                    fmt_num(max)
                ),
                "value_error",
            ));
        }
    }
    if let Some(m) = field.multiple_of {
        if !(num as u64).is_multiple_of(m as u64) {
            let lower = (num as u64 / m as u64).max(1) * m as u64;
            return Err(err(
                format!("{} is not a multiple of {m} (try {lower})", fmt_num(num)),
                "value_error",
            ));
        }
    }
    Ok(match field.kind {
        Kind::Integer => json!(num as u64),
        _ => json!(num),
    })
}

/// Validates a request's `input` object into generation parameters. Every bad field
/// is reported (Cog lists them all); unknown fields are dropped, as Cog does.
pub fn parse_input(
    input: &Value,
    d: &GenerationParams,
) -> Result<GenerationParams, Vec<FieldError>> {
    let empty = Map::new();
    let obj = match input {
        Value::Object(o) => o,
        Value::Null => &empty,
        _ => {
            return Err(vec![FieldError {
                field: "input".into(),
                msg: "value is not a valid dict".into(),
                kind: "type_error.dict",
            }])
        }
    };
    let mut errors = Vec::new();
    let mut values: Map<String, Value> = Map::new();
    for field in fields(d) {
        match obj.get(field.name).filter(|v| !v.is_null()) {
            None if field.required => errors.push(FieldError {
                field: field.name.into(),
                msg: "field required".into(),
                kind: "value_error.missing",
            }),
            None => {
                if let Some(d) = field.default {
                    values.insert(field.name.into(), d);
                }
            }
            Some(v) => match check(&field, v) {
                Ok(v) => {
                    values.insert(field.name.into(), v);
                }
                Err(e) => errors.push(e),
            },
        }
    }
    if let Some(Value::String(p)) = values.get("prompt") {
        if p.trim().is_empty() {
            errors.insert(
                0,
                FieldError {
                    field: "prompt".into(),
                    msg: "prompt is empty".into(),
                    kind: "value_error",
                },
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let int = |k: &str| values.get(k).and_then(Value::as_u64);
    let num = |k: &str| values.get(k).and_then(Value::as_f64);
    let text = |k: &str| {
        values
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(GenerationParams {
        prompt: text("prompt"),
        negative_prompt: text("negative_prompt"),
        width: int("width").map_or(d.width, |v| v as usize),
        height: int("height").map_or(d.height, |v| v as usize),
        num_images: int("num_images_per_prompt").map_or(1, |v| v as usize),
        seed: int("seed"),
        prior_steps: int("prior_num_inference_steps").map(|v| v as usize),
        prior_guidance: num("prior_guidance_scale").unwrap_or(d.prior_guidance),
        decoder_steps: int("decoder_num_inference_steps").map_or(d.decoder_steps, |v| v as usize),
        decoder_guidance: num("decoder_guidance_scale").unwrap_or(d.decoder_guidance),
    })
}

/// Cog's OpenAPI document: the inputs under `components.schemas.Input`, the output
/// (a list of PNG data URLs) under `Output`, and the request / response types.
pub fn openapi(d: &GenerationParams) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for (i, f) in fields(d).iter().enumerate() {
        let mut p = json!({
            "title": title(f.name),
            "type": f.kind.openapi_type(),
            "description": f.description,
            "x-order": i,
        });
        if let Some(d) = &f.default {
            p["default"] = d.clone();
        }
        if let Some(m) = f.minimum {
            p["minimum"] = json!(m);
        }
        if let Some(m) = f.maximum {
            p["maximum"] = json!(m);
        }
        if let Some(m) = f.multiple_of {
            p["multipleOf"] = json!(m);
        }
        if f.required {
            required.push(f.name);
        }
        props.insert(f.name.into(), p);
    }
    let status = json!({
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    });
    json!({
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get",
                "responses": {"200": {"description": "Successful Response"}}}},
            "/health-check": {"get": {"summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": {"description": "Successful Response"}}}},
            "/predictions": {"post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema":
                    {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": {
                    "200": {"description": "Successful Response", "content":
                        {"application/json": {"schema":
                            {"$ref": "#/components/schemas/PredictionResponse"}}}},
                    "422": {"description": "Validation Error", "content":
                        {"application/json": {"schema":
                            {"$ref": "#/components/schemas/HTTPValidationError"}}}}
                }
            }},
            "/predictions/{prediction_id}": {"put": {
                "summary": "Predict Idempotent",
                "operationId": "predict_idempotent_predictions__prediction_id__put",
                "responses": {"200": {"description": "Successful Response"}}
            }},
            "/predictions/{prediction_id}/cancel": {"post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "responses": {"200": {"description": "Successful Response"}}
            }},
            "/shutdown": {"post": {"summary": "Start Shutdown",
                "operationId": "start_shutdown_shutdown_post",
                "responses": {"200": {"description": "Successful Response"}}}}
        },
        "components": {"schemas": {
            "Input": {"title": "Input", "type": "object", "properties": props,
                "required": required},
            "Output": {"title": "Output", "type": "array",
                "items": {"type": "string", "format": "uri"}},
            "Status": status,
            "PredictionRequest": {"title": "PredictionRequest", "type": "object",
                "properties": {
                    "input": {"$ref": "#/components/schemas/Input"},
                    "id": {"title": "Id", "type": "string"},
                    "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                    "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
                    "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                    "webhook_events_filter": {"type": "array", "items": {"enum":
                        ["start", "output", "logs", "completed"], "type": "string"},
                        "default": ["start", "output", "logs", "completed"]}
                }},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object",
                "properties": {
                    "input": {"$ref": "#/components/schemas/Input"},
                    "output": {"$ref": "#/components/schemas/Output"},
                    "id": {"title": "Id", "type": "string"},
                    "version": {"title": "Version", "type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": "string", "format": "date-time"},
                    "completed_at": {"type": "string", "format": "date-time"},
                    "logs": {"title": "Logs", "type": "string", "default": ""},
                    "error": {"title": "Error", "type": "string"},
                    "status": {"$ref": "#/components/schemas/Status"},
                    "metrics": {"title": "Metrics", "type": "object"}
                }},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object",
                "properties": {"detail": {"title": "Detail", "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"}}}},
            "ValidationError": {"title": "ValidationError", "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"title": "Location", "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"title": "Message", "type": "string"},
                    "type": {"title": "Error Type", "type": "string"}
                }}
        }}
    })
}

/// `num_images_per_prompt` -> "Num Images Per Prompt", as pydantic titles fields.
fn title(name: &str) -> String {
    name.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native() -> GenerationParams {
        GenerationParams {
            width: 128,
            height: 128,
            prior_guidance: 7.5,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_what_is_absent() {
        let p = parse_input(&json!({"prompt": "a cat", "unknown": 3}), &native()).unwrap();
        assert_eq!(
            p,
            GenerationParams {
                prompt: "a cat".into(),
                ..native()
            }
        );
        let p = parse_input(
            &json!({"prompt": "x", "width": 256.0, "seed": 7, "prior_num_inference_steps": 10,
                     "num_images_per_prompt": 2, "decoder_guidance_scale": 2}),
            &native(),
        )
        .unwrap();
        assert_eq!(
            (
                p.width,
                p.seed,
                p.prior_steps,
                p.num_images,
                p.decoder_guidance
            ),
            (256, Some(7), Some(10), 2, 2.0)
        );
    }

    #[test]
    fn every_bad_field_is_listed() {
        let errs = parse_input(
            &json!({"width": 1000, "height": "big", "num_images_per_prompt": 9,
                     "prior_guidance_scale": -1, "seed": 1.5}),
            &native(),
        )
        .unwrap_err();
        let got: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.field.as_str(), e.msg.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("prompt", "field required"),
                ("width", "1000 is not a multiple of 128 (try 896)"),
                ("height", "value is not a valid integer"),
                (
                    "num_images_per_prompt",
                    "9 is greater than the maximum of 4"
                ),
                ("prior_guidance_scale", "-1 is less than the minimum of 0"),
                ("seed", "value is not a valid integer"),
            ]
        );
        assert_eq!(
            errs[3].to_json(),
            json!({"loc": ["body", "input", "num_images_per_prompt"],
                   "msg": "9 is greater than the maximum of 4", "type": "value_error"})
        );
        assert!(parse_input(&json!([1]), &native()).is_err());
    }

    #[test]
    fn openapi_lists_the_inputs_with_their_limits() {
        let doc = openapi(&native());
        let input = &doc["components"]["schemas"]["Input"];
        let props = input["properties"].as_object().unwrap();
        let names: Vec<&str> = props.keys().map(String::as_str).collect();
        for f in fields(&native()) {
            assert!(names.contains(&f.name), "{}", f.name);
        }
        assert_eq!(input["required"], json!(["prompt"]));
        let n = &props["num_images_per_prompt"];
        assert_eq!(
            (
                n["maximum"].as_f64(),
                n["default"].as_u64(),
                n["x-order"].as_u64()
            ),
            (Some(4.0), Some(1), Some(4))
        );
        // the model's own defaults are the documented ones
        assert_eq!(props["width"]["default"], json!(128));
        assert_eq!(props["prior_guidance_scale"]["default"], json!(7.5));
        assert_eq!(n["title"], "Num Images Per Prompt");
        assert_eq!(doc["components"]["schemas"]["Output"]["type"], "array");
    }
}
