//! API keys as digests through the whole stack: a revoked, an expired and an unknown key get
//! the same 401; rotation keeps both keys working for the overlap; a property test of the
//! memory store against a model. (That logs never show a key: `tests/logs.rs`.)

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use proptest::prelude::*;
use tower_402::keys::{KeyDigest, KeyHasher, Keys, MemoryKeyStore};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

fn app(keys: Keys<MemoryKeyStore>, runs: Arc<AtomicUsize>) -> Router {
    let plans = MemoryPlanStore::new()
        .with(Subscription::active("acme", "basic"))
        .with(Subscription::active("globex", "basic"));
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1));
    let billing = Billing::new(keys, plans, MemoryLedger::new(), catalog);
    Router::new()
        .route(
            "/",
            get(move |e: axum::Extension<Entitlement>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move { e.account.to_string() }
            }),
        )
        .layer(billing.layer())
}

#[tokio::test]
async fn revoked_expired_and_unknown_keys_get_the_same_answer() {
    let clock = ManualClock::new(Timestamp::from_unix(1_700_000_000));
    let keys =
        Keys::new(KeyHasher::hmac(b"test secret"), MemoryKeyStore::new()).with_clock(clock.clone());
    keys.add("k1", "sk_live_first", "acme").await.unwrap();
    keys.add("k2", "sk_live_second", "acme").await.unwrap();
    keys.add("k3", "sk_live_globex", "globex").await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(keys.clone(), runs.clone());

    for key in ["sk_live_first", "sk_live_second"] {
        let a = common::get(&app, "/", key).await;
        assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"acme"[..]));
    }
    assert_eq!(
        common::get(&app, "/", "sk_live_globex").await.body,
        "globex"
    );

    // Changes at run time reach the next request.
    keys.revoke("k2").await.unwrap();
    keys.rotate("k1", "k4", "sk_live_fourth", 30).await.unwrap();
    assert_eq!(common::get(&app, "/", "sk_live_first").await.status, 200);
    assert_eq!(common::get(&app, "/", "sk_live_fourth").await.status, 200);
    clock.advance(30);
    assert_eq!(common::get(&app, "/", "sk_live_fourth").await.status, 200);
    let ran = runs.load(Ordering::SeqCst);

    let unknown = common::get(&app, "/", "sk_live_never_issued").await;
    let revoked = common::get(&app, "/", "sk_live_second").await;
    let expired = common::get(&app, "/", "sk_live_first").await;
    let doc = unknown.problem(401, "UNAUTHENTICATED");
    for other in [&revoked, &expired] {
        assert_eq!(other.status, unknown.status);
        assert_eq!(other.json(), doc, "the same body");
        assert_eq!(other.headers, unknown.headers, "the same headers");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        ran,
        "no refused key ran the handler"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        id: u8,
        secret: u8,
        account: u8,
    },
    Rotate {
        old: u8,
        new: u8,
        secret: u8,
        overlap: u64,
    },
    Revoke {
        id: u8,
    },
    Advance(u64),
    Resolve {
        secret: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6u8, 0..8u8, 0..3u8).prop_map(|(id, secret, account)| Op::Add {
            id,
            secret,
            account
        }),
        (0..6u8, 0..6u8, 0..8u8, 0..20u64).prop_map(|(old, new, secret, overlap)| Op::Rotate {
            old,
            new,
            secret,
            overlap
        }),
        (0..6u8).prop_map(|id| Op::Revoke { id }),
        (0..15u64).prop_map(Op::Advance),
        (0..8u8).prop_map(|secret| Op::Resolve { secret }),
    ]
}

/// The model: id → (secret, account, end).
type Model = HashMap<u8, (u8, u8, Option<u64>)>;

fn model_resolve(m: &Model, secret: u8, now: u64) -> Option<u8> {
    m.values()
        .find(|(s, _, end)| *s == secret && end.is_none_or(|e| now < e))
        .map(|(_, a, _)| *a)
}

fn model_add(m: &mut Model, id: u8, secret: u8, account: u8) -> bool {
    let same_id = m.get(&id);
    let same_secret = m.iter().find(|(_, (s, _, _))| *s == secret);
    match (same_id, same_secret) {
        (None, None) => {
            m.insert(id, (secret, account, None));
            true
        }
        (Some(&(s, a, _)), Some((&i, _))) => s == secret && a == account && i == id,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Add, rotate, revoke and time passing, against a model: every lookup agrees.
    #[test]
    fn the_memory_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let t0 = 1_000_000u64;
            let clock = ManualClock::new(Timestamp::from_unix(t0));
            let keys = Keys::new(KeyHasher::hmac(b"p"), MemoryKeyStore::new())
                .with_clock(clock.clone());
            let mut m = Model::new();
            let secret = |s: u8| format!("sk_{s}");
            for op in ops {
                let now = clock.now().unix();
                match op {
                    Op::Add { id, secret: s, account } => {
                        let got = keys.add(id.to_string(), &secret(s), account.to_string()).await;
                        prop_assert_eq!(got.is_ok(), model_add(&mut m, id, s, account));
                    }
                    Op::Rotate { old, new, secret: s, overlap } => {
                        let got = keys.rotate(&old.to_string(), new.to_string(), &secret(s), overlap).await;
                        let want = match m.get(&old).copied() {
                            None => false,
                            Some((_, account, _)) => {
                                let ok = model_add(&mut m, new, s, account);
                                if ok {
                                    let end = now + overlap;
                                    let e = &mut m.get_mut(&old).unwrap().2;
                                    *e = Some(e.map_or(end, |x| x.min(end)));
                                }
                                ok
                            }
                        };
                        prop_assert_eq!(got.is_ok(), want);
                    }
                    Op::Revoke { id } => {
                        prop_assert_eq!(keys.revoke(&id.to_string()).await.unwrap(), m.remove(&id).is_some());
                    }
                    Op::Advance(s) => clock.advance(s),
                    Op::Resolve { secret: s } => {
                        let got = keys.resolve(&ApiKey::parse(&secret(s)).unwrap()).await.unwrap();
                        let want = model_resolve(&m, s, now).map(|a| AccountId::new(a.to_string()));
                        prop_assert_eq!(got, want);
                    }
                }
            }
            Ok(())
        })?;
    }

    /// The constant-time comparison agrees with `==`, whichever byte differs.
    #[test]
    fn constant_time_compare_agrees_with_eq(a in any::<[u8; 32]>(), flip in 0..33usize, bit in 0..8u8) {
        let x = KeyDigest::from_bytes(a);
        let mut b = a;
        if flip < 32 {
            b[flip] ^= 1 << bit;
        }
        let y = KeyDigest::from_bytes(b);
        prop_assert_eq!(x.ct_eq(&y), x == y);
        prop_assert_eq!(x.ct_eq(&y), flip == 32);
    }
}
