//! [`RedisLedger`]: the [`Ledger`] on Redis, one script call per operation.

use super::*;

/// The Redis ledger. Clones share the connection. See the [module docs](super).
#[derive(Clone)]
pub struct RedisLedger {
    pub(super) conn: Conn,
    pub(super) prefix: String,
    pub(super) retention_secs: u64,
    pub(super) journal: crate::ledger::JournalLimits,
    pub(super) scripts: Arc<Scripts>,
    pub(super) records: records::RedisRecords,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.prefix)
            .field("retention_secs", &self.retention_secs)
            .finish_non_exhaustive()
    }
}

impl RedisLedger {
    /// A ledger with its own connection, opened on first use: building one succeeds while
    /// Redis is down (operations then fail with [`StoreError`] until it is back).
    pub fn new(config: &RedisConfig) -> Self {
        let conn = config.connection();
        RedisLedger {
            records: records::RedisRecords::new(conn.clone(), config.prefix.clone()),
            conn,
            prefix: config.prefix.clone(),
            retention_secs: config.retention_secs,
            journal: config.journal,
            scripts: Arc::new(Scripts::new()),
        }
    }

    pub(super) fn base(&self, account: &AccountId) -> String {
        account_base(&self.prefix, account)
    }

    pub(super) async fn run(
        &self,
        script: &Script,
        account: &AccountId,
        now: Timestamp,
        args: &[String],
    ) -> Result<(String, Reply), LedgerError> {
        let mut conn = self.conn.get().await?;
        let mut inv = script.key(self.base(account));
        inv.arg(exact(now.unix())?)
            .arg(self.retention_secs)
            .arg(self.retention_secs.clamp(MIN_GC_SECS, MAX_EXACT));
        for a in args {
            inv.arg(a);
        }
        // Last, so each script's own arguments keep their places: the prelude reads these
        // two from the end.
        inv.arg(self.journal.retention_secs)
            .arg(self.journal.max_entries);
        let v: Value = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Reply::new(v)
    }

    /// Open reservations of an account after expiring the due ones (for tests and
    /// diagnostics).
    pub async fn open_reservations(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<u64, LedgerError> {
        match self.run(&self.scripts.open, account, now, &[]).await? {
            (tag, mut r) if tag == "open" => r.u64(),
            (tag, _) => Err(unexpected(&tag)),
        }
    }

    /// The server-side id (`CLIENT ID`) of this ledger's current connection, for
    /// diagnostics such as finding it in `CLIENT LIST`.
    pub async fn client_id(&self) -> Result<i64, StoreError> {
        let mut conn = self.conn.get().await?;
        redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    fn records(&self) -> Option<&dyn crate::ledger::ResponseRecords> {
        Some(&self.records)
    }

    fn journal(&self) -> Option<&dyn Journal> {
        Some(self)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        req.validate()?;
        let args = reserve_args(req)?;
        let (tag, mut r) = self
            .run(&self.scripts.reserve, &req.account, req.now, &args)
            .await?;
        match tag.as_str() {
            "reserved" => {
                let credits = r.credits()?;
                let expires_at = Timestamp::from_unix(r.u64()?);
                let available_after = r.credits()?;
                let n = r.count()?;
                let allowance_units = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                let allowance_left = (0..n)
                    .map(|_| r.int().map(|v| u64::try_from(v).ok()))
                    .collect::<Result<_, _>>()?;
                Ok(ReserveOutcome::Reserved(Reservation {
                    id: req.id(),
                    credits,
                    allowance_units,
                    expires_at,
                    available_after,
                    allowance_left,
                }))
            }
            "in_progress" => Ok(ReserveOutcome::Replayed(Replay::InProgress)),
            "completed" => Ok(ReserveOutcome::Replayed(Replay::Completed(r.settlement()?))),
            "conflict" => Err(LedgerError::KeyConflict),
            "range" => Err(LedgerError::AmountOutOfRange),
            "insufficient" => Ok(ReserveOutcome::Denied(Denial::InsufficientCredits {
                balance: r.credits()?,
                required: r.credits()?,
            })),
            "quota" => {
                let i = r.count()?;
                let used = r.u64()?;
                let c = i
                    .checked_sub(1)
                    .and_then(|i| req.charges.get(i))
                    .ok_or_else(|| corrupt("script reply: bad charge index"))?;
                Ok(ReserveOutcome::Denied(Denial::QuotaExceeded {
                    meter: c.meter.clone(),
                    limit: c.allowance.map_or(0, |a| a.limit),
                    used,
                    resets_at: c.allowance.map(|a| a.resets_at),
                    window_secs: c.allowance.map(|a| a.start.secs_until(a.resets_at)),
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let mut per_meter: BTreeMap<&str, u64> = BTreeMap::new();
        for u in usage {
            let e = per_meter.entry(u.meter.as_str()).or_default();
            *e = e.saturating_add(u.units).min(MAX_EXACT);
        }
        let policy = match policy {
            OverEstimate::CapAtHold => "cap".to_owned(),
            OverEstimate::Overdraft(limit) => format!("od:{}", limit.min(Credits::MAX_EXACT)),
            _ => "draw".to_owned(),
        };
        let mut args = vec![id.key.to_string(), policy, per_meter.len().to_string()];
        for (m, u) in per_meter {
            args.push(m.to_owned());
            args.push(u.to_string());
        }
        let (tag, mut r) = self
            .run(&self.scripts.settle, &id.account, now, &args)
            .await?;
        match tag.as_str() {
            "settled" => r.settlement(),
            "unknown" => Err(LedgerError::UnknownReservation),
            "already_settled" => Err(LedgerError::AlreadySettled),
            "already_released" => Err(LedgerError::AlreadyReleased),
            other => Err(unexpected(other)),
        }
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        let (tag, _) = self
            .run(
                &self.scripts.release,
                &id.account,
                now,
                &[id.key.to_string()],
            )
            .await?;
        match tag.as_str() {
            "ok" => Ok(()),
            "unknown" => Err(LedgerError::UnknownReservation),
            "already_settled" => Err(LedgerError::AlreadySettled),
            other => Err(unexpected(other)),
        }
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        let args = [key.to_owned(), amount.get().to_string()];
        let (tag, mut r) = self.run(&self.scripts.deposit, account, now, &args).await?;
        match tag.as_str() {
            "applied" | "unchanged" => Ok(Deposit {
                applied: tag == "applied",
                balance: r.balance()?,
            }),
            "conflict" => Err(LedgerError::KeyConflict),
            "range" => Err(LedgerError::AmountOutOfRange),
            other => Err(unexpected(other)),
        }
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        match self.run(&self.scripts.balance, account, now, &[]).await? {
            (tag, mut r) if tag == "balance" => r.balance(),
            (tag, _) => Err(unexpected(&tag)),
        }
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        let args = [
            meter.as_str().to_owned(),
            exact(window_start.unix())?.to_string(),
        ];
        match self
            .run(&self.scripts.allowance, account, now, &args)
            .await?
        {
            (tag, mut r) if tag == "usage" => Ok(AllowanceUsage {
                used: r.u64()?,
                held: r.u64()?,
            }),
            (tag, _) => Err(unexpected(&tag)),
        }
    }
}

#[async_trait]
impl Journal for RedisLedger {
    /// Reads the account's list (at most `max_entries` long) and keeps what the query and
    /// the retention time select.
    async fn entries(
        &self,
        account: &AccountId,
        query: &JournalQuery,
        now: Timestamp,
    ) -> Result<Vec<JournalEntry>, LedgerError> {
        let mut conn = self.conn.get().await?;
        let lines: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{}:j", self.base(account)))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let retention = self.journal.retention_secs;
        let mut out = Vec::new();
        for line in lines.iter().rev() {
            let e = journal_entry(line)?;
            if e.at.plus_secs(retention) > now && query.covers(e.at) {
                out.push(e);
                if out.len() >= query.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn adjust(
        &self,
        account: &AccountId,
        adjustment: &Adjustment,
        now: Timestamp,
    ) -> Result<Adjusted, LedgerError> {
        let amount = adjustment.credits;
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        let direction = match adjustment.direction {
            Direction::Credit => "credit",
            Direction::Debit => "debit",
        };
        let args = [
            adjustment.key.clone(),
            direction.to_owned(),
            amount.get().to_string(),
            adjustment.reason.clone(),
        ];
        let (tag, mut r) = self.run(&self.scripts.adjust, account, now, &args).await?;
        match tag.as_str() {
            "applied" | "unchanged" => Ok(Adjusted {
                applied: tag == "applied",
                available_after: r.credits()?,
            }),
            "conflict" => Err(LedgerError::KeyConflict),
            "range" => Err(LedgerError::AmountOutOfRange),
            other => Err(unexpected(other)),
        }
    }
}

/// One journal line as the scripts write it: `seq|at|kind|credits|direction|available|`
/// then a JSON object of the strings (`r` the reference, `w` the reason).
fn journal_entry(line: &str) -> Result<JournalEntry, LedgerError> {
    let bad = || corrupt("unreadable journal entry");
    let mut f = line.splitn(7, '|');
    let mut num =
        || -> Result<u64, LedgerError> { f.next().and_then(|v| v.parse().ok()).ok_or_else(bad) };
    let (seq, at) = (num()?, num()?);
    let kind = match f.next() {
        Some("deposit") => EntryKind::Deposit,
        Some("settle") => EntryKind::Settle,
        Some("release") => EntryKind::Release,
        Some("expiry") => EntryKind::Expiry,
        Some("shortfall") => EntryKind::Shortfall,
        Some("adjustment") => EntryKind::Adjustment,
        _ => return Err(bad()),
    };
    let credits = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let direction = match f.next() {
        Some("credit") => Some(Direction::Credit),
        Some("debit") => Some(Direction::Debit),
        Some("") => None,
        _ => return Err(bad()),
    };
    let available = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    #[derive(serde::Deserialize)]
    struct Strings {
        r: Option<String>,
        w: Option<String>,
    }
    // cjson encodes an empty table as `{}`, and a missing string as an absent member.
    let strings: Strings = f
        .next()
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(bad)?;
    Ok(JournalEntry {
        seq,
        at: Timestamp::from_unix(at),
        kind,
        credits: Credits::new(credits),
        direction,
        available_after: Credits::new(available),
        reference: strings.r,
        reason: strings.w,
    })
}
