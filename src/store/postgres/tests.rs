//! Unit tests of the configuration and the stored shapes.

use super::*;

#[test]
fn identifiers_are_validated() {
    let c = PostgresConfig::new("postgres://u@localhost/db").expect("url");
    assert!(c.clone().schema("billing_2").is_ok());
    assert!(c.clone().table_prefix("").is_ok());
    for bad in [
        "",
        "2x",
        "a-b",
        "A",
        "a\"b",
        "a;drop",
        "x y",
        &"a".repeat(41),
    ] {
        assert!(c.clone().schema(bad).is_err(), "{bad:?}");
    }
    assert!(c.table_prefix("p\"").is_err());
}

/// `LedgerSql::load` finds the allowance windows of loaded reservations in their stored
/// charges at `c ->> 'meter'` and `c -> 'allowance' ->> 'start'`: keep the JSON that way.
#[test]
fn stored_charges_have_the_paths_the_load_reads() {
    use crate::plan::AllowanceWindow;
    let charge = crate::ledger::Charge {
        meter: Meter::new("calls"),
        units: 2,
        unit_price: Credits::new(3),
        price_per: 1,
        allowance: Some(AllowanceWindow {
            limit: 10,
            start: Timestamp::from_unix(60),
            resets_at: Timestamp::from_unix(120),
        }),
        overage: true,
    };
    let json = serde_json::to_value(vec![charge]).expect("charges serialize");
    assert_eq!(json[0]["meter"], serde_json::json!("calls"));
    assert_eq!(json[0]["allowance"]["start"], serde_json::json!(60));
}
