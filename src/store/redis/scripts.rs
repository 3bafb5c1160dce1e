//! The Lua scripts (one per ledger operation, each in its own `.lua` file headed with the
//! `AccountBook` function it mirrors), their arguments and their replies.

use super::*;

/// Shared by every script: state loading, lazy expiry, the split of a charge.
pub(super) const PRELUDE: &str = include_str!("prelude.lua");

/// ARGV: 4 key, 5 fingerprint, 6 expires_at, 7 ttl, 8 n, then 9 per charge: meter, units,
/// price, price per, overage, has allowance, limit, window start, resets at; then whether
/// the key is an idempotency key (`1`: keep the record for the retention time once finished;
/// `0`: a key unique to one request, forgotten when settled or released); whether the hold
/// is charged at expiry (`1`) or given back (`0`); the attempt (`ReserveRequest::attempt`,
/// `0`: none).
pub(super) const RESERVE: &str = include_str!("reserve.lua");

/// ARGV: 4 key, 5 policy (`draw`, `cap` or `od:<limit>`), 6 m, then m pairs of meter, units.
pub(super) const SETTLE: &str = include_str!("settle.lua");

/// ARGV: 4 key.
pub(super) const RELEASE: &str = include_str!("release.lua");

/// ARGV: 4 key, 5 amount.
pub(super) const DEPOSIT: &str = include_str!("deposit.lua");

pub(super) const BALANCE: &str = include_str!("balance.lua");

/// ARGV: 4 meter, 5 window start.
pub(super) const ALLOWANCE: &str = include_str!("allowance.lua");

pub(super) const OPEN: &str = include_str!("open.lua");

pub(super) const ADJUST: &str = include_str!("adjust.lua");

/// ARGV 4 onwards of the reserve script for `req` (see `RESERVE`).
pub(super) fn reserve_args(req: &ReserveRequest) -> Result<Vec<String>, LedgerError> {
    let ttl = exact(req.ttl_secs)?;
    let expires_at = req.now.plus_secs(ttl);
    let mut args = vec![
        req.key.to_string(),
        req.fingerprint.to_string(),
        exact(expires_at.unix())?.to_string(),
        ttl.to_string(),
        req.charges.len().to_string(),
    ];
    for c in req.charges.iter() {
        let (has, limit, start, resets) = match c.allowance {
            Some(w) => (
                "1",
                exact(w.limit)?,
                exact(w.start.unix())?,
                exact(w.resets_at.unix())?,
            ),
            None => ("0", 0, 0, 0),
        };
        args.extend([
            c.meter.as_str().to_owned(),
            exact(c.units)?.to_string(),
            exact(c.unit_price.get())?.to_string(),
            exact(c.price_per.max(1))?.to_string(),
            if c.overage { "1" } else { "0" }.to_owned(),
            has.to_owned(),
            limit.to_string(),
            start.to_string(),
            resets.to_string(),
        ]);
    }
    args.push(if req.idempotent { "1" } else { "0" }.to_owned());
    args.push(
        match req.on_expiry {
            crate::ledger::OnExpiry::Release => "0",
            _ => "1",
        }
        .to_owned(),
    );
    args.push(req.attempt.to_string());
    Ok(args)
}

pub(super) struct Scripts {
    pub(super) reserve: Script,
    pub(super) settle: Script,
    pub(super) release: Script,
    pub(super) deposit: Script,
    pub(super) balance: Script,
    pub(super) allowance: Script,
    pub(super) open: Script,
    pub(super) adjust: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            reserve: s(RESERVE),
            settle: s(SETTLE),
            release: s(RELEASE),
            deposit: s(DEPOSIT),
            balance: s(BALANCE),
            allowance: s(ALLOWANCE),
            open: s(OPEN),
            adjust: s(ADJUST),
        }
    }
}

/// Reads a script's reply: a tag, then integers and strings.
pub(super) struct Reply {
    pub(super) items: std::vec::IntoIter<Value>,
}

impl Reply {
    pub(super) fn new(v: Value) -> Result<(String, Reply), LedgerError> {
        let Value::Array(items) = v else {
            return Err(corrupt("script reply is not an array"));
        };
        let mut r = Reply {
            items: items.into_iter(),
        };
        let tag = r.string()?;
        Ok((tag, r))
    }

    pub(super) fn string(&mut self) -> Result<String, LedgerError> {
        match self.items.next() {
            Some(Value::BulkString(b)) => {
                String::from_utf8(b).map_err(|_| corrupt("script reply is not utf-8"))
            }
            Some(Value::SimpleString(s)) => Ok(s),
            _ => Err(corrupt("script reply: expected a string")),
        }
    }

    pub(super) fn int(&mut self) -> Result<i64, LedgerError> {
        match self.items.next() {
            Some(Value::Int(i)) => Ok(i),
            _ => Err(corrupt("script reply: expected an integer")),
        }
    }

    pub(super) fn u64(&mut self) -> Result<u64, LedgerError> {
        u64::try_from(self.int()?).map_err(|_| corrupt("script reply: negative amount"))
    }

    pub(super) fn credits(&mut self) -> Result<Credits, LedgerError> {
        Ok(Credits::new(self.u64()?))
    }

    pub(super) fn count(&mut self) -> Result<usize, LedgerError> {
        usize::try_from(self.u64()?).map_err(|_| corrupt("script reply: bad count"))
    }

    pub(super) fn balance(&mut self) -> Result<Balance, LedgerError> {
        Ok(Balance {
            available: self.credits()?,
            held: self.credits()?,
            settled: self.credits()?,
            deposited: self.credits()?,
            overdrawn: self.credits()?,
        })
    }

    pub(super) fn settlement(&mut self) -> Result<Settlement, LedgerError> {
        let charged = self.credits()?;
        let available_after = self.credits()?;
        let short_credits = self.credits()?;
        let n = self.count()?;
        let allowance_units = (0..n).map(|_| self.u64()).collect::<Result<_, _>>()?;
        let k = self.count()?;
        let units = (0..k)
            .map(|_| Ok((Meter::new(self.string()?), self.u64()?)))
            .collect::<Result<_, LedgerError>>()?;
        let unspent_after = self.credits()?;
        let allowance_used_after = (0..n)
            .map(|_| self.int().map(|v| u64::try_from(v).ok()))
            .collect::<Result<_, _>>()?;
        Ok(Settlement {
            unspent_after,
            allowance_used_after,
            charged,
            allowance_units,
            shortfall: Shortfall {
                credits: short_credits,
                units,
            },
            available_after,
        })
    }
}
