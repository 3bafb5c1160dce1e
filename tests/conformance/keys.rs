//! The same assertions against every [`KeyStore`]: lookups by digest, add / rotate / revoke at
//! run time, conflicts, and the raw keys the backend test then looks for in the stored data.

use tower_402::keys::{KeyError, KeyHasher, KeyStore, Keys};
use tower_402::{ApiKey, IdentityResolver, ManualClock};

use super::{acct, at};

/// The raw secrets [`key_store`] adds: none of them may appear in what the backend stored.
pub const RAW_KEYS: [&str; 4] = [
    "sk_live_conformance_ONE_1",
    "sk_live_conformance_TWO_2",
    "sk_live_conformance_GLOBEX_3",
    "sk_live_conformance_ROTATED_4",
];

async fn who(keys: &Keys<impl KeyStore>, raw: &str) -> Option<String> {
    keys.resolve(&ApiKey::parse(raw).unwrap())
        .await
        .unwrap()
        .map(|a| a.to_string())
}

pub async fn key_store(store: impl KeyStore + Clone) {
    let clock = ManualClock::new(at(0));
    let keys = Keys::new(KeyHasher::hmac(b"conformance secret"), store).with_clock(clock.clone());
    let [one, two, globex, rotated] = RAW_KEYS;

    // Many keys per account.
    keys.add("k1", one, "acme").await.unwrap();
    keys.add("k2", two, "acme").await.unwrap();
    keys.add("k3", globex, "globex").await.unwrap();
    assert_eq!(who(&keys, one).await.as_deref(), Some("acme"));
    assert_eq!(who(&keys, two).await.as_deref(), Some("acme"));
    assert_eq!(who(&keys, globex).await.as_deref(), Some("globex"));
    assert_eq!(who(&keys, "sk_live_never_added").await, None);
    let mut ids: Vec<String> = keys
        .store()
        .keys_of(&acct("acme"))
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["k1", "k2"]);

    // A retried add succeeds; a different key under a taken id or secret does not.
    keys.add("k1", one, "acme").await.unwrap();
    assert!(matches!(
        keys.add("k1", rotated, "acme").await,
        Err(KeyError::Conflict)
    ));
    assert!(matches!(
        keys.add("k9", one, "acme").await,
        Err(KeyError::Conflict)
    ));
    assert!(matches!(
        keys.add("k1", one, "globex").await,
        Err(KeyError::Conflict)
    ));
    assert!(matches!(
        keys.add("bad", "has space", "acme").await,
        Err(KeyError::Invalid(_))
    ));
    assert_eq!(
        who(&keys, rotated).await,
        None,
        "a refused add added nothing"
    );

    // Rotation: both valid for the overlap, then only the new one.
    keys.rotate("k1", "k4", rotated, 60).await.unwrap();
    assert_eq!(who(&keys, one).await.as_deref(), Some("acme"));
    assert_eq!(who(&keys, rotated).await.as_deref(), Some("acme"));
    clock.advance(59);
    assert_eq!(who(&keys, one).await.as_deref(), Some("acme"));
    // A retried rotation cannot extend the old key's life.
    keys.rotate("k1", "k4", rotated, 3_600).await.unwrap();
    clock.advance(1);
    assert_eq!(who(&keys, one).await, None, "the overlap is over");
    assert_eq!(who(&keys, rotated).await.as_deref(), Some("acme"));
    let old = keys.store().by_id("k1").await.unwrap().unwrap();
    assert_eq!(old.not_after, Some(at(60)));
    assert!(matches!(
        keys.rotate("nope", "k5", "sk_live_other", 0).await,
        Err(KeyError::UnknownId)
    ));

    // Revocation: at once, like an unknown key; the other keys are untouched.
    assert!(keys.revoke("k2").await.unwrap());
    assert!(!keys.revoke("k2").await.unwrap());
    assert_eq!(who(&keys, two).await, None);
    assert_eq!(keys.store().by_id("k2").await.unwrap(), None);
    assert_eq!(who(&keys, globex).await.as_deref(), Some("globex"));
    assert_eq!(who(&keys, rotated).await.as_deref(), Some("acme"));
    // The id is free again, and the secret too.
    keys.add("k2", two, "globex").await.unwrap();
    assert_eq!(who(&keys, two).await.as_deref(), Some("globex"));

    // Another server secret digests differently: the same table answers nothing.
    let other = Keys::new(KeyHasher::hmac(b"another secret"), keys.store().clone());
    assert_eq!(who(&other, globex).await, None);
}
