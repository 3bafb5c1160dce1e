use std::collections::BTreeMap;

use http::request::Parts;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::credits::Credits;
use crate::decision::{Cost, CustomDenial, Denial};
use crate::metering::{Pricing, PricingRequest};
use crate::plan::Meter;

/// Prices of one model, in credits per [`PriceTable::per`] tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// Credits per `per` input (prompt) tokens.
    pub input: Credits,
    /// Credits per `per` output (completion) tokens.
    pub output: Credits,
    /// The most output tokens a request may ask for; larger `max_tokens` are estimated at this.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// The output estimate when the request sets no `max_tokens`.
    #[serde(default)]
    pub default_output_tokens: Option<u64>,
}

impl ModelPrice {
    /// `input` and `output` credits per [`PriceTable::per`] tokens.
    pub fn new(input: u64, output: u64) -> Self {
        ModelPrice {
            input: Credits::new(input),
            output: Credits::new(output),
            max_output_tokens: None,
            default_output_tokens: None,
        }
    }
}

fn per_million() -> u64 {
    1_000_000
}
fn default_output() -> u64 {
    4096
}
fn input_meter() -> Meter {
    Meter::new("input_tokens")
}
fn output_meter() -> Meter {
    Meter::new("output_tokens")
}

/// A per-model price table, deserializable from configuration.
///
/// ```
/// use tower_402::metering::PriceTable;
///
/// let table: PriceTable = serde_json::from_str(r#"{
///   "per": 1000000,
///   "models": {
///     "small-model": { "input": 150, "output": 600 },
///     "large-model": { "input": 2500, "output": 10000, "max_output_tokens": 16384 }
///   }
/// }"#).unwrap();
/// assert_eq!(table.models["small-model"].output.get(), 600);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceTable {
    /// How many tokens a price buys: 1,000,000 (the default) or 1,000.
    #[serde(default = "per_million")]
    pub per: u64,
    /// Prices by model name.
    pub models: BTreeMap<String, ModelPrice>,
    /// The price of models not in `models`. Without it an unknown model is refused with
    /// `400 UNKNOWN_MODEL`.
    #[serde(default)]
    pub default: Option<ModelPrice>,
    /// The output estimate when neither the request nor the model says (default 4096).
    #[serde(default = "default_output")]
    pub default_output_tokens: u64,
    /// The meter input tokens are counted on (default `input_tokens`).
    #[serde(default = "input_meter")]
    pub input_meter: Meter,
    /// The meter output tokens are counted on (default `output_tokens`).
    #[serde(default = "output_meter")]
    pub output_meter: Meter,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            per: per_million(),
            models: BTreeMap::new(),
            default: None,
            default_output_tokens: default_output(),
            input_meter: input_meter(),
            output_meter: output_meter(),
        }
    }
}

impl PriceTable {
    /// An empty table priced per million tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a model.
    pub fn model(mut self, name: impl Into<String>, price: ModelPrice) -> Self {
        self.models.insert(name.into(), price);
        self
    }

    /// Sets the price of unknown models.
    pub fn default_price(mut self, price: ModelPrice) -> Self {
        self.default = Some(price);
        self
    }
}

/// Prices OpenAI-compatible requests (`POST …/chat/completions`, `…/completions`,
/// `…/embeddings`) from their JSON body.
///
/// The estimate has two costs: input tokens on [`PriceTable::input_meter`] and output tokens
/// on [`PriceTable::output_meter`], each at the model's price per [`PriceTable::per`] tokens,
/// rounded up to whole credits.
///
/// - **Input**: there is no tokenizer in the request path, so the estimate is the body's size
///   in bytes divided by 4, rounded up. For text this over-estimates (JSON syntax counts too);
///   the settlement uses the actual figure from the response.
/// - **Output**: `max_completion_tokens`, else `max_tokens`, times `n`; capped at the model's
///   `max_output_tokens`; when absent, the model's `default_output_tokens`, else the table's
///   (4096). Embeddings have no output.
///
/// Refusals, all `400` problems: a body that is not a JSON object (`INVALID_REQUEST`), no
/// `model` string (`INVALID_REQUEST`), a `max_tokens` or `n` that is not a positive integer
/// (`INVALID_REQUEST`), a model not in the table when it has no default
/// (`UNKNOWN_MODEL`, with the `model` member).
///
/// Other requests (other paths, other methods) are priced by the route's fixed cost, if any.
#[derive(Debug, Clone)]
pub struct OpenAiPricing {
    table: PriceTable,
}

impl OpenAiPricing {
    /// Prices with `table`.
    ///
    /// # Panics
    ///
    /// If the table's input and output meters are the same: usage is reported per meter, so
    /// the two could not be told apart (configuration is checked when it is built, like a
    /// router's routes).
    #[track_caller]
    pub fn new(table: PriceTable) -> Self {
        assert!(
            table.input_meter != table.output_meter,
            "PriceTable: input_meter and output_meter must differ (both are `{}`)",
            table.input_meter
        );
        OpenAiPricing { table }
    }

    /// The output tokens each choice of a completion request is priced for: what
    /// [`estimate`](Pricing::estimate) reserves per choice (`max_completion_tokens`, else
    /// `max_tokens`, else the model's or the table's default output, capped at the model's
    /// `max_output_tokens`).
    ///
    /// A proxy hands this to its model as the request's output limit, so that the model never
    /// produces more than was held. Refused as the estimate is: a request that is not a JSON
    /// object, names no known `model`, or has a `max_tokens` that is not a positive integer.
    ///
    /// ```
    /// use tower_402::metering::{ModelPrice, OpenAiPricing, PriceTable};
    ///
    /// let mut price = ModelPrice::new(150, 600);
    /// price.max_output_tokens = Some(4096);
    /// let pricing = OpenAiPricing::new(PriceTable::new().model("small-model", price));
    /// let asks = |max: u64| serde_json::json!({"model": "small-model", "max_tokens": max});
    /// assert_eq!(pricing.output_tokens(&asks(200)).unwrap(), 200);
    /// assert_eq!(pricing.output_tokens(&asks(1_000_000)).unwrap(), 4096);
    /// ```
    pub fn output_tokens(&self, request: &Value) -> Result<u64, Denial> {
        let Value::Object(obj) = request else {
            return Err(invalid("The request body must be a JSON object."));
        };
        let price = self.price(obj)?;
        self.output_per_choice(price, obj)
    }

    /// The price of the model the request names.
    fn price(&self, obj: &serde_json::Map<String, Value>) -> Result<&ModelPrice, Denial> {
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("The request must name a `model`."))?;
        match self.table.models.get(model).or(self.table.default.as_ref()) {
            Some(p) => Ok(p),
            None => {
                let shown: String = model.chars().take(128).collect();
                Err(Denial::Custom(Box::new(
                    CustomDenial::new(
                        StatusCode::BAD_REQUEST,
                        "UNKNOWN_MODEL",
                        "Unknown model",
                        format!("There is no price for the model `{shown}`."),
                    )
                    .member("model", shown),
                )))
            }
        }
    }

    /// The output tokens priced for each choice: see [`output_tokens`](Self::output_tokens).
    fn output_per_choice(
        &self,
        price: &ModelPrice,
        obj: &serde_json::Map<String, Value>,
    ) -> Result<u64, Denial> {
        let asked = match positive(
            obj.get("max_completion_tokens"),
            "`max_completion_tokens` must be a positive integer.",
        )? {
            Some(n) => Some(n),
            None => positive(
                obj.get("max_tokens"),
                "`max_tokens` must be a positive integer.",
            )?,
        };
        let per_choice = asked
            .or(price.default_output_tokens)
            .unwrap_or(self.table.default_output_tokens);
        Ok(match price.max_output_tokens {
            Some(cap) => per_choice.min(cap),
            None => per_choice,
        })
    }

    fn kind(parts: &Parts) -> Option<Kind> {
        if parts.method != Method::POST {
            return None;
        }
        let path = parts.uri.path().trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Kind::Chat)
        } else if path.ends_with("/completions") {
            Some(Kind::Completion)
        } else if path.ends_with("/embeddings") {
            Some(Kind::Embedding)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
    Embedding,
}

fn invalid(detail: &'static str) -> Denial {
    Denial::BadRequest {
        code: "INVALID_REQUEST",
        detail: detail.into(),
    }
}

fn positive(v: Option<&Value>, what: &'static str) -> Result<Option<u64>, Denial> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(what)),
        },
    }
}

impl Pricing for OpenAiPricing {
    fn needs_body(&self, parts: &Parts) -> bool {
        Self::kind(parts).is_some()
    }

    fn estimate(&self, request: &PricingRequest<'_>) -> Result<Vec<Cost>, Denial> {
        let Some(kind) = Self::kind(request.parts) else {
            return Ok(request.entitlement.cost.iter().cloned().collect());
        };
        let body = request.body.unwrap_or_default();
        let json: Value = serde_json::from_slice(body)
            .map_err(|_| invalid("The request body must be a JSON object."))?;
        let Value::Object(obj) = json else {
            return Err(invalid("The request body must be a JSON object."));
        };
        let price = self.price(&obj)?;
        let input_units = (body.len() as u64).div_ceil(4);
        let output_units = if kind == Kind::Embedding {
            0
        } else {
            let per_choice = self.output_per_choice(price, &obj)?;
            let n = positive(obj.get("n"), "`n` must be a positive integer.")?.unwrap_or(1);
            if n > 128 {
                return Err(invalid("`n` must be at most 128."));
            }
            per_choice.saturating_mul(n)
        };
        Ok(vec![
            Cost::new(self.table.input_meter.as_str(), input_units, price.input)
                .per(self.table.per),
            Cost::new(self.table.output_meter.as_str(), output_units, price.output)
                .per(self.table.per),
        ])
    }
}
