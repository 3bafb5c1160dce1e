use std::collections::BTreeMap;

use http::request::Parts;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::credits::Credits;
use crate::decision::{Cost, CustomDenial, Denial};
use crate::entitlement::Entitlement;
use crate::metering::tokens::TokenMeters;
use crate::metering::{Pricing, PricingRequest};
use crate::plan::{Catalog, Meter, PlanId};

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
    /// Credits per `per` cached input tokens (read from the provider's prompt cache). Without
    /// it they are priced as input tokens.
    #[serde(default)]
    pub cached_input: Option<Credits>,
    /// Credits per `per` tokens written to the prompt cache (Anthropic's cache creation).
    /// Without it they are priced as input tokens.
    #[serde(default)]
    pub cache_write: Option<Credits>,
    /// Credits per `per` reasoning tokens. Without it they are priced as output tokens.
    #[serde(default)]
    pub reasoning: Option<Credits>,
    /// The lowest plan [tier](crate::plan::Plan::tier) that includes this model: a request
    /// from a lower plan is refused with `402 PLAN_UPGRADE_REQUIRED`.
    #[serde(default)]
    pub required_tier: Option<u32>,
    /// A plan [feature](crate::plan::Plan::features) that includes this model: a request
    /// from a plan without it is refused with `402 PLAN_UPGRADE_REQUIRED`.
    #[serde(default)]
    pub required_feature: Option<String>,
}

impl ModelPrice {
    /// `input` and `output` credits per [`PriceTable::per`] tokens.
    pub fn new(input: u64, output: u64) -> Self {
        ModelPrice {
            input: Credits::new(input),
            output: Credits::new(output),
            max_output_tokens: None,
            default_output_tokens: None,
            cached_input: None,
            cache_write: None,
            reasoning: None,
            required_tier: None,
            required_feature: None,
        }
    }

    /// Only plans of `tier` or higher include this model.
    pub fn required_tier(mut self, tier: u32) -> Self {
        self.required_tier = Some(tier);
        self
    }

    /// Only plans with `feature` include this model.
    pub fn required_feature(mut self, feature: impl Into<String>) -> Self {
        self.required_feature = Some(feature.into());
        self
    }

    /// Prices cached input tokens at `credits` per [`PriceTable::per`].
    pub fn cached_input(mut self, credits: u64) -> Self {
        self.cached_input = Some(Credits::new(credits));
        self
    }

    /// Whether a plan includes this model: `Ok`, or the tier or feature it lacks.
    fn included_in(&self, plan: Option<&crate::plan::Plan>) -> bool {
        let Some(plan) = plan else {
            return self.required_tier.is_none() && self.required_feature.is_none();
        };
        self.required_tier.is_none_or(|t| plan.tier >= t)
            && self
                .required_feature
                .as_deref()
                .is_none_or(|f| plan.has_feature(f))
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
fn cached_input_meter() -> Meter {
    Meter::new("cached_input_tokens")
}
fn cache_write_meter() -> Meter {
    Meter::new("cache_write_tokens")
}
fn reasoning_meter() -> Meter {
    Meter::new("reasoning_tokens")
}

/// A per-model price table, deserializable from configuration.
///
/// Each model has input and output prices, and optionally prices of its own for cached input
/// tokens (`cached_input`), prompt-cache writes (`cache_write`) and reasoning tokens
/// (`reasoning`); without them those tokens are priced as input or output tokens. A model can
/// be kept to some plans with `required_tier` (the lowest plan tier that includes it) or
/// `required_feature` (a plan feature): a request for it from a plan without them is refused
/// with `402 PLAN_UPGRADE_REQUIRED`, naming the `model`, the `current_plan` and the
/// `required_plan` (the cheapest plan in the catalog that includes it).
///
/// ```
/// use tower_402::metering::PriceTable;
///
/// let table: PriceTable = serde_json::from_str(r#"{
///   "per": 1000000,
///   "models": {
///     "small-model": { "input": 150, "output": 600 },
///     "large-model": { "input": 2500, "output": 10000, "cached_input": 1250,
///                      "max_output_tokens": 16384, "required_tier": 2 }
///   }
/// }"#).unwrap();
/// assert_eq!(table.models["small-model"].output.get(), 600);
/// assert_eq!(table.models["large-model"].required_tier, Some(2));
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
    /// The meter cached input tokens are counted on, for models with a `cached_input` price
    /// (default `cached_input_tokens`).
    #[serde(default = "cached_input_meter")]
    pub cached_input_meter: Meter,
    /// The meter prompt-cache writes are counted on, for models with a `cache_write` price
    /// (default `cache_write_tokens`).
    #[serde(default = "cache_write_meter")]
    pub cache_write_meter: Meter,
    /// The meter reasoning tokens are counted on, for models with a `reasoning` price
    /// (default `reasoning_tokens`).
    #[serde(default = "reasoning_meter")]
    pub reasoning_meter: Meter,
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
            cached_input_meter: cached_input_meter(),
            cache_write_meter: cache_write_meter(),
            reasoning_meter: reasoning_meter(),
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

    pub(crate) fn token_meters(&self) -> TokenMeters {
        TokenMeters {
            input: self.input_meter.clone(),
            output: self.output_meter.clone(),
            cached_input: self.cached_input_meter.clone(),
            cache_write: self.cache_write_meter.clone(),
            reasoning: self.reasoning_meter.clone(),
        }
    }
}

/// Prices LLM requests from their JSON body: OpenAI-compatible Chat Completions
/// (`POST …/chat/completions`), completions (`…/completions`), embeddings (`…/embeddings`),
/// OpenAI Responses (`…/responses`) and Anthropic Messages (`…/messages`).
///
/// The estimate has two costs: input tokens on [`PriceTable::input_meter`] and output tokens
/// on [`PriceTable::output_meter`], each at the model's price per [`PriceTable::per`] tokens,
/// rounded up to whole credits; plus a cost of zero units on each detail meter the model has
/// a price of its own for (cached input, cache write, reasoning), so that the settlement
/// charges those tokens at that price (the estimate holds all input at the input price and
/// all output at the output price).
///
/// - **Input**: there is no tokenizer in the request path, so the estimate is the body's size
///   in bytes divided by 4, rounded up. For text this over-estimates (JSON syntax counts too);
///   the settlement uses the actual figure from the response.
/// - **Output**: `max_completion_tokens`, else `max_output_tokens` (Responses), else
///   `max_tokens` (Chat, completions, Anthropic Messages), times `n`; capped at the model's
///   `max_output_tokens`; when absent, the model's `default_output_tokens`, else the table's
///   (4096). Embeddings have no output. The output cost may be
///   [lowered to the allowance](Cost::lower_to_allowance) a plan without overage has left.
///
/// Refusals: a body that is not a JSON object (`400 INVALID_REQUEST`), no `model` string
/// (`400 INVALID_REQUEST`), a `max_tokens` or `n` that is not a positive integer
/// (`400 INVALID_REQUEST`), a model not in the table when it has no default
/// (`400 UNKNOWN_MODEL`, with the `model` member), a model the caller's plan does not include
/// (`402 PLAN_UPGRADE_REQUIRED` with `model`, `current_plan` and `required_plan`, or
/// `required_feature`). All before anything is held or the handler runs.
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
    /// If two of the table's meters are the same: usage is reported per meter, so they could
    /// not be told apart (configuration is checked when it is built, like a router's routes).
    #[track_caller]
    pub fn new(table: PriceTable) -> Self {
        let meters = [
            &table.input_meter,
            &table.output_meter,
            &table.cached_input_meter,
            &table.cache_write_meter,
            &table.reasoning_meter,
        ];
        for (i, a) in meters.iter().enumerate() {
            for b in &meters[i + 1..] {
                assert!(
                    a != b,
                    "PriceTable: the input, output, cached input, cache write and reasoning \
                     meters must differ (two are `{a}`)"
                );
            }
        }
        OpenAiPricing { table }
    }

    /// The table it prices with.
    pub fn table(&self) -> &PriceTable {
        &self.table
    }

    /// The output tokens each choice of a completion request is priced for: what
    /// [`estimate`](Pricing::estimate) reserves per choice (`max_completion_tokens`, else
    /// `max_output_tokens`, else `max_tokens`, else the model's or the table's default output,
    /// capped at the model's `max_output_tokens`).
    ///
    /// A proxy hands this to its model as the request's output limit, so that the model never
    /// produces more than was held; [`output_limit`](Self::output_limit) also takes in a
    /// reservation lowered to a plan's allowance. Refused as the estimate is: a request that
    /// is not a JSON object, names no known `model`, or has a `max_tokens` that is not a
    /// positive integer.
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
        let (_, price) = self.price(obj)?;
        self.output_per_choice(price, obj)
    }

    /// The most output tokens each choice may produce under the request's reservation:
    /// [`output_tokens`](Self::output_tokens), or less when the metering layer
    /// [lowered](Cost::lower_to_allowance) the output reservation to what a plan without
    /// overage had left of its allowance ([`Entitlement::reserved_below_estimate`]).
    pub fn output_limit(&self, request: &Value, entitlement: &Entitlement) -> Result<u64, Denial> {
        let per_choice = self.output_tokens(request)?;
        let Some(lowered) = entitlement.reserved_below_estimate(&self.table.output_meter) else {
            return Ok(per_choice);
        };
        let n = request
            .get("n")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
            .unwrap_or(1);
        Ok(per_choice.min(lowered / n))
    }

    /// The model the request names and its price.
    fn price<'a>(
        &'a self,
        obj: &'a serde_json::Map<String, Value>,
    ) -> Result<(&'a str, &'a ModelPrice), Denial> {
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("The request must name a `model`."))?;
        match self.table.models.get(model).or(self.table.default.as_ref()) {
            Some(p) => Ok((model, p)),
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
        let mut asked = None;
        for (field, what) in [
            (
                "max_completion_tokens",
                "`max_completion_tokens` must be a positive integer.",
            ),
            (
                "max_output_tokens",
                "`max_output_tokens` must be a positive integer.",
            ),
            ("max_tokens", "`max_tokens` must be a positive integer."),
        ] {
            if let Some(n) = positive(obj.get(field), what)? {
                asked = Some(n);
                break;
            }
        }
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
        } else if path.ends_with("/responses") {
            Some(Kind::Responses)
        } else if path.ends_with("/messages") {
            Some(Kind::Messages)
        } else {
            None
        }
    }
}

/// The refusal of a model the caller's plan does not include: the cheapest plan in the
/// catalog that does, or the feature it needs.
fn upgrade(
    model: &str,
    price: &ModelPrice,
    entitlement: &Entitlement,
    catalog: &Catalog,
) -> Denial {
    let required_plan = catalog
        .plans()
        .filter(|p| price.included_in(Some(p)))
        .min_by_key(|p| p.tier)
        .map(|p| p.id.clone());
    let shown: String = model.chars().take(128).collect();
    Denial::PlanUpgradeRequired {
        current_plan: entitlement
            .plan
            .as_ref()
            .map_or_else(|| PlanId::new("none"), |p| p.id.clone()),
        required_plan,
        required_feature: price
            .required_feature
            .clone()
            .filter(|f| !entitlement.plan.as_ref().is_some_and(|p| p.has_feature(f))),
        model: Some(shown),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
    Embedding,
    Responses,
    Messages,
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
        let (model, price) = self.price(&obj)?;
        if !price.included_in(request.entitlement.plan.as_deref()) {
            return Err(upgrade(model, price, request.entitlement, request.catalog));
        }
        let input_units = (body.len() as u64).div_ceil(4);
        let output_units = if kind == Kind::Embedding {
            0
        } else {
            let per_choice = self.output_per_choice(price, &obj)?;
            let n = match kind {
                Kind::Chat | Kind::Completion => {
                    positive(obj.get("n"), "`n` must be a positive integer.")?.unwrap_or(1)
                }
                _ => 1,
            };
            if n > 128 {
                return Err(invalid("`n` must be at most 128."));
            }
            per_choice.saturating_mul(n)
        };
        let t = &self.table;
        let mut costs = vec![
            Cost::new(t.input_meter.as_str(), input_units, price.input).per(t.per),
            Cost::new(t.output_meter.as_str(), output_units, price.output)
                .per(t.per)
                .lower_to_allowance(),
        ];
        for (meter, detail) in [
            (&t.cached_input_meter, price.cached_input),
            (&t.cache_write_meter, price.cache_write),
            (&t.reasoning_meter, price.reasoning),
        ] {
            if let Some(unit_price) = detail {
                costs.push(Cost::new(meter.as_str(), 0, unit_price).per(t.per));
            }
        }
        Ok(costs)
    }
}
