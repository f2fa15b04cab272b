//! The tally and its forms, from events made here.

use std::collections::BTreeMap;

use super::*;
use crate::{
    audit::{AuditContext, AuditEvent, Outcome, RefusalTally},
    authz::{IdentityPattern, PurposeSet, Rule},
};

fn event(time: &str, identity: &str, method: &'static str, outcome: Outcome) -> AuditEvent {
    let mut event = AuditContext {
        request_id: "r".into(),
        identity: identity.into(),
        method,
        purpose: None,
        items: 1,
        failed_items: 0,
    }
    .event(outcome);
    event.time = time.into();
    event
}

fn reveal(
    time: &str,
    identity: &str,
    purpose: &str,
    field_types: &[&str],
    items: u32,
    failed: u32,
) -> AuditEvent {
    let mut e = event(time, identity, "Detokenize", Outcome::Ok);
    e.purpose = Some(purpose.into());
    e.field_types = field_types.iter().map(|s| (*s).to_owned()).collect();
    e.items = items;
    e.failed_items = failed;
    e
}

fn sample() -> Vec<AuditEvent> {
    let mut refused = event(
        "2026-12-02T10:00:00Z",
        "spiffe://x/checkout",
        "Detokenize",
        Outcome::PermissionDenied,
    );
    refused.purpose = Some("customer_support".into());
    refused.refusals = Some(RefusalTally {
        count: 7,
        first: "2026-12-02T09:00:00Z".into(),
        last: "2026-12-02T10:00:00Z".into(),
    });
    let mut consent = event(
        "2026-12-02T11:00:00Z",
        "spiffe://x/privacy",
        "SetConsent",
        Outcome::Ok,
    );
    consent.purpose = Some("marketing".into());
    consent.consent = Some(crate::audit::ConsentNote::Withdrawn);
    let mut policy = event(
        "2026-12-01T08:00:00Z",
        "-",
        crate::audit::POLICY_LOAD_METHOD,
        Outcome::Ok,
    );
    policy.policy_hash = Some("ab".repeat(32));
    vec![
        policy,
        reveal(
            "2026-12-01T09:00:00Z",
            "spiffe://x/support",
            "customer_support",
            &["email"],
            3,
            1,
        ),
        reveal(
            "2026-12-01T12:00:00Z",
            "spiffe://x/shipping",
            "order_fulfilment",
            &["address", "email"],
            2,
            0,
        ),
        reveal(
            "2026-12-02T09:30:00Z",
            "spiffe://x/support",
            "customer_support",
            &["email"],
            1,
            0,
        ),
        // Allowed, but every item failed: nothing was revealed.
        reveal(
            "2026-12-02T09:40:00Z",
            "spiffe://x/support",
            "customer_support",
            &["email"],
            1,
            1,
        ),
        refused,
        consent,
        event(
            "2026-12-02T12:00:00Z",
            "spiffe://x/privacy",
            "EraseSubject",
            Outcome::Ok,
        ),
        event(
            "2026-12-02T12:05:00Z",
            "spiffe://x/privacy",
            "ExportSubject",
            Outcome::Ok,
        ),
        event(
            "2026-12-02T13:00:00Z",
            "spiffe://x/ops",
            "RotateKeys",
            Outcome::Ok,
        ),
        reveal(
            "2026-12-05T09:00:00Z",
            "spiffe://x/support",
            "customer_support",
            &["email"],
            4,
            0,
        ),
    ]
}

fn policy() -> Policy {
    Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://x/support").unwrap(),
        vec!["detokenize:*".parse().unwrap()],
        PurposeSet::Only(["customer_support".parse().unwrap()].into()),
    )])
}

fn report_of(events: &[AuditEvent], since: Option<&str>, until: Option<&str>) -> ProcessingReport {
    let period = Period {
        since: since.map(Into::into),
        until: until.map(Into::into),
    };
    let mut tally = tally_of(&period);
    for (i, e) in events.iter().enumerate() {
        tally.add(i as u64 + 1, e);
    }
    let fields = FieldRegistry::default();
    let held: BTreeMap<String, u64> = [("email".to_owned(), 5)].into();
    let keys = vec![("dek/0000000001".to_owned(), time_ms("2026-11-01T00:00:00Z"))];
    tally.finish(
        &fields,
        &policy(),
        period,
        &held,
        &keys,
        time_ms("2026-12-06T00:00:00Z"),
    )
}

#[test]
fn reveals_refusals_rights_and_loads_are_counted_from_the_events() {
    let report = report_of(&sample(), None, None);
    assert_eq!(report.audit.events, 11);
    let reveals: Vec<(&str, &str, &str, u64)> = report
        .reveals
        .iter()
        .map(|r| {
            (
                r.identity.as_str(),
                r.field_type.as_str(),
                r.purpose.as_str(),
                r.calls,
            )
        })
        .collect();
    assert_eq!(
        reveals,
        [
            ("spiffe://x/shipping", "address", "order_fulfilment", 1),
            ("spiffe://x/shipping", "email", "order_fulfilment", 1),
            ("spiffe://x/support", "email", "customer_support", 3),
        ]
    );
    let days: Vec<(&str, &str, u64)> = report
        .reveals_per_day
        .iter()
        .map(|d| (d.day.as_str(), d.purpose.as_str(), d.values))
        .collect();
    assert_eq!(
        days,
        [
            ("2026-12-01", "customer_support", 2),
            ("2026-12-01", "order_fulfilment", 2),
            ("2026-12-02", "customer_support", 1),
            ("2026-12-05", "customer_support", 4),
        ]
    );
    assert_eq!(report.refusals.len(), 1);
    assert_eq!(
        report.refusals[0].calls, 7,
        "an aggregated refusal counts its calls"
    );
    assert_eq!(
        report.rights,
        Rights {
            exports: 1,
            erasures: 1,
            rectifications: 0,
            access_histories: 0
        }
    );
    assert_eq!(report.consent_changes[0].withdrawn, 1);
    assert_eq!(report.key_rotations.len(), 1);
    assert_eq!(report.policy_loads[0].policy_hash, "ab".repeat(32));
    assert_eq!(report.keys[0].age_days, 35);
    assert_eq!(report.identities[0].purposes, ["customer_support"]);
}

#[test]
fn the_period_bounds_the_audit_part() {
    let report = report_of(
        &sample(),
        Some("2026-12-02T00:00:00Z"),
        Some("2026-12-02T23:59:59Z"),
    );
    assert_eq!(report.audit.events, 7);
    assert_eq!((report.audit.first_seq, report.audit.last_seq), (4, 10));
    assert!(report.policy_loads.is_empty());
    assert_eq!(report.reveals_per_day.len(), 1);
}

#[test]
fn markdown_and_html_show_what_the_json_says() {
    let report = report_of(&sample(), None, None);
    let md = markdown(&report);
    assert!(
        md.contains("| spiffe://x/support | email | customer_support | 3 |"),
        "{md}"
    );
    assert!(md.contains("| 2026-12-05 | customer_support | 4 |"), "{md}");
    let page = html(&report);
    // Every bar of the chart is one row of reveals_per_day, with its count.
    let bars: Vec<(String, String, u64)> = page
        .split("<rect class=\"bar\" ")
        .skip(1)
        .map(|bar| {
            let attr = |name: &str| {
                let start = bar.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                bar[start..start + bar[start..].find('"').unwrap()].to_owned()
            };
            (
                attr("data-day"),
                attr("data-purpose"),
                attr("data-values").parse().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, u64)> = report
        .reveals_per_day
        .iter()
        .map(|d| (d.day.clone(), d.purpose.clone(), d.values))
        .collect();
    assert_eq!(bars, expected);
    assert!(!page.contains("<script"), "no script in the page");
    assert!(
        !page.contains("http://") || page.matches("http://").count() == 1,
        "nothing fetched (only the SVG namespace)"
    );
}

#[test]
fn html_escapes_what_it_shows() {
    let mut events = sample();
    events[1].identity = "cn:<b>&\"x\"".into();
    let page = html(&report_of(&events, None, None));
    assert!(!page.contains("<b>&"), "unescaped identity");
    assert!(page.contains("cn:&lt;b&gt;&amp;&quot;x&quot;"));
}

#[test]
fn equal_policies_hash_equal_and_any_change_shows() {
    let hash = policy().hash();
    assert_eq!(hash, policy().hash());
    let wider = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://x/support").unwrap(),
        vec!["detokenize:*".parse().unwrap()],
        PurposeSet::Any,
    )]);
    assert_ne!(hash, wider.hash());
    assert_ne!(hash, Policy::default().hash());
}
