// Signatures made by Stripe's own Node library, for scripts/stripe-check.sh.
//
//   node stripe_signatures.js generate CASES.json   writes cases signed by
//                                                   stripe.webhooks.generateTestHeaderString
//   node stripe_signatures.js check OURS.json       verifies the headers tower-402 signed
//                                                   with stripe.webhooks.constructEvent
"use strict";
const fs = require("fs");
const Stripe = require("stripe");

const stripe = Stripe("sk_test_tower402_signature_check");
const [mode, file] = process.argv.slice(2);
const now = Math.floor(Date.now() / 1000);
const secret = "whsec_tower402_stripe_check";
const next = "whsec_tower402_stripe_check_rotated";

function event(id, credits) {
  return JSON.stringify({
    id, object: "event", api_version: "2025-03-31.basil", created: now, type: "checkout.session.completed",
    data: { object: { id: "cs_test_" + id, object: "checkout.session", payment_status: "paid",
                      payment_intent: "pi_" + id, metadata: { account_id: "acct_sdk", credits: String(credits) } } },
  }, null, 2); // pretty-printed, as Stripe sends it: the signature is over these exact bytes
}

function header(payload, key, timestamp) {
  return stripe.webhooks.generateTestHeaderString({ payload, secret: key, timestamp: timestamp ?? now });
}

if (mode === "generate") {
  const good = event("evt_sdk_good", 7);
  const cases = [
    { name: "genuine", payload: good, header: header(good, secret), expect: "accept" },
    { name: "signed with the rotated secret", payload: event("evt_sdk_rotated", 3),
      header: header(event("evt_sdk_rotated", 3), next), expect: "accept" },
    { name: "tampered body", payload: good.replace('"7"', '"7000"'), header: header(good, secret), expect: "reject" },
    { name: "another secret", payload: good, header: header(good, "whsec_someone_else"), expect: "reject" },
    { name: "ten minutes old", payload: good, header: header(good, secret, now - 600), expect: "reject" },
  ];
  fs.writeFileSync(file, JSON.stringify({ secrets: [secret, next], cases }));
} else if (mode === "check") {
  const ours = JSON.parse(fs.readFileSync(file, "utf8"));
  const e = stripe.webhooks.constructEvent(ours.payload, ours.header, ours.secret);
  if (e.id !== ours.id) throw new Error(`constructEvent read ${e.id}, expected ${ours.id}`);
  let refused = false;
  try {
    stripe.webhooks.constructEvent(ours.payload + " ", ours.header, ours.secret);
  } catch (err) {
    refused = err.type === "StripeSignatureVerificationError";
  }
  if (!refused) throw new Error("Stripe's library accepted a tampered body");
  console.log("ok: Stripe's library verifies tower-402's signature and refuses it on a tampered body");
} else {
  console.error("usage: stripe_signatures.js generate|check FILE");
  process.exit(2);
}
