//! The command line, end to end, against a temp store.
//!
//! Every test runs the real `klantreis` binary in a [`Sandbox`] (a temp folder with a
//! copy of the shipped config and rules, whose store lives in the folder) and always
//! passes `--now`, so results do not depend on the day the tests run. Custom rule files
//! are written into the sandbox to pin down the rule contract exactly.

use crate::support::{code, json_lines, stderr, stdout, Sandbox};
use serde_json::{json, Value};
use std::time::Duration;

/// The evaluation time most tests use, and the same as unix seconds.
const NOW: &str = "2026-11-20T12:00:00Z";
const NOW_UNIX: i64 = 1_795_176_000;

/// Rule settings for sandboxes whose tests are not about budgets: the default operation
/// budget, and a wall-clock budget long enough that a busy machine cannot trip it.
const CALM: &str = "[rules]\ntimeout_ms = 10000\n";

/// Generous limit for commands that must not hang (a rule with `loop {}`).
const WATCHDOG: Duration = Duration::from_secs(60);

fn jsonl(customers: &[Value]) -> String {
    customers.iter().map(|c| format!("{c}\n")).collect()
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `explain ID --json` at `now`, parsed.
fn explain_json(sb: &Sandbox, id: &str, now: &str) -> Value {
    let o = sb.run(&["explain", id, "--json", "--now", now]);
    assert_eq!(code(&o), 0, "explain {id}: {}{}", stdout(&o), stderr(&o));
    parse_json(&stdout(&o))
}

/// The explanation of one journey from `explain --json`.
fn journey_of<'a>(x: &'a Value, journey: &str) -> &'a Value {
    x["journeys"]
        .as_array()
        .expect("journeys is an array")
        .iter()
        .find(|j| j["journey"] == journey)
        .unwrap_or_else(|| panic!("no journey {journey} in {x:#}"))
}

fn funnel_json(sb: &Sandbox) -> Value {
    let o = sb.run(&["funnel", "--json"]);
    assert_eq!(code(&o), 0, "funnel: {}", stderr(&o));
    parse_json(&stdout(&o))
}

fn nurture_json(sb: &Sandbox, now: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["nurture", "--json", "--now", now];
    args.extend_from_slice(extra);
    let o = sb.run(&args);
    (code(&o), parse_json(&stdout(&o)))
}

fn import_stdin(sb: &Sandbox, customers: &[Value]) -> String {
    let o = sb.run_stdin(&["import"], Some(&jsonl(customers)));
    assert_eq!(code(&o), 0, "import: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The shipped config's journeys: (name, phases), in order.
fn shipped_journeys(sb: &Sandbox) -> Vec<(String, Vec<String>)> {
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(sb.config()).unwrap()).unwrap();
    cfg["journeys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let phases = j["phases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string());
            (j["name"].as_str().unwrap().to_string(), phases.collect())
        })
        .collect()
}

/// The 1-based line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not found"))
        + 1
}

// ------------------------------------------------------------------------- check

#[test]
fn check_is_clean_on_the_shipped_config() {
    let sb = Sandbox::shipped();
    let o = sb.run(&["check"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
    let o = sb.run(&["check", "--json"]);
    assert_eq!(code(&o), 0);
    let v = parse_json(&stdout(&o));
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["journeys"], json!(shipped_journeys(&sb).len()));
    assert_eq!(v["problems"], json!([]));
}

#[test]
fn check_names_file_line_and_column_of_a_syntax_error() {
    let sb = Sandbox::shipped();
    let path = sb.path().join("rules/5k.rhai");
    let mut text = std::fs::read_to_string(&path).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let line = text.lines().count() + 3;
    text.push_str("\nfn broken(x) {\n    let y = ;\n}\n");
    std::fs::write(&path, text).unwrap();
    let o = sb.run(&["check"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("rules/5k.rhai:{line}:13: ")),
        "want rules/5k.rhai:{line}:13 in:\n{out}"
    );
    assert!(out.contains("1 problem(s) found"), "{out}");
}

#[test]
fn check_names_unknown_config_keys_with_their_position() {
    // (what to insert, before which line of the shipped config (a needle), the key)
    let cases: &[(&str, &str, &str)] = &[
        ("colour = 3", "cache_mb", "colour"),
        ("max_operation = 5", "timeout_ms", "max_operation"),
        ("phasse = [\"x\"]", "rules = \"rules/5k.rhai\"", "phasse"),
        ("verbose = true", "[store]", "verbose"),
    ];
    let shipped = std::fs::read_to_string(crate::support::repo().join("config.toml")).unwrap();
    for (insert, before, key) in cases {
        let sb = Sandbox::shipped();
        let line = line_of(&shipped, before);
        let mut lines: Vec<&str> = shipped.lines().collect();
        lines.insert(line - 1, insert);
        sb.write("config.toml", &lines.join("\n"));
        let o = sb.run(&["check"]);
        let out = stdout(&o);
        assert_eq!(code(&o), 1, "{insert}: {out}{}", stderr(&o));
        assert!(
            out.contains(&format!("config.toml:{line}:1: ")),
            "{insert}: want config.toml:{line}:1 in\n{out}"
        );
        assert!(
            out.contains(&format!("`{key}`")),
            "{insert}: the key is not named in\n{out}"
        );
    }
}

#[test]
fn check_reports_every_config_problem_at_once() {
    let sb = Sandbox::custom(CALM, &[("a", "fn phase(c) { \"p\" }\n", &["p", "q", "p"])]);
    let mut cfg = std::fs::read_to_string(sb.config()).unwrap();
    cfg.push_str(
        "\n[[journeys]]\nname = \"b\"\nrules = \"rules/missing.rhai\"\nphases = [\"x\"]\n",
    );
    sb.write("config.toml", &cfg);
    let o = sb.run(&["check"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    let dup = line_of(&cfg, "phases = [\"p\", \"q\", \"p\"]");
    let missing = line_of(&cfg, "rules/missing.rhai");
    assert!(
        out.contains(&format!(
            "config.toml:{dup}:10: phase \"p\" is listed twice"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("config.toml:{missing}:9: rule file ")),
        "{out}"
    );
    assert!(out.contains("rules/missing.rhai does not exist"), "{out}");
    assert!(out.contains("2 problem(s) found"), "{out}");
}

#[test]
fn check_reports_every_rule_problem_at_once() {
    let sb = Sandbox::custom(
        CALM,
        &[
            (
                "x",
                "fn phase(customer) {\n    let n = 1;\n    n +\n}\n",
                &["a"],
            ),
            (
                "y",
                "// helpers\nimport \"lib/nope\" as nope;\nfn phase(customer) { \"a\" }\n",
                &["a"],
            ),
            ("z", "fn other(customer) {\n    \"a\"\n}\n", &["a"]),
            (
                "w",
                "fn phase(customer) {\n    undefined_thing\n}\n",
                &["a"],
            ),
        ],
    );
    let o = sb.run(&["check"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    for want in [
        "rules/x.rhai:4:1: ",
        "rules/y.rhai:",
        "lib/nope",
        "rules/z.rhai:1:1: the rule file defines no `fn phase(customer)`",
        "rules/w.rhai:2:5: ",
        "undefined_thing",
        "4 problem(s) found",
    ] {
        assert!(out.contains(want), "want {want:?} in\n{out}");
    }
}

#[test]
fn check_names_the_line_of_a_bad_import() {
    let rule = "// helpers\n\nimport \"lib/nope\" as nope;\nfn phase(customer) { \"a\" }\n";
    let sb = Sandbox::custom(CALM, &[("y", rule, &["a"])]);
    let o = sb.run(&["check"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("rules/y.rhai:3:1: "),
        "want rules/y.rhai:3:1 in\n{out}"
    );
}

#[test]
fn check_reports_config_and_rule_problems_in_one_run() {
    let sb = Sandbox::custom(
        CALM,
        &[
            ("a", "fn phase(c) { \"p\" }\n", &["p", "p"]),
            (
                "c",
                "import \"lib/does_not_exist\" as d;\nfn phase(c) { \"x\" }\n",
                &["x"],
            ),
        ],
    );
    let mut cfg = std::fs::read_to_string(sb.config()).unwrap();
    cfg.push_str(
        "\n[[journeys]]\nname = \"b\"\nrules = \"rules/missing.rhai\"\nphases = [\"x\"]\n",
    );
    sb.write("config.toml", &cfg);
    let o = sb.run(&["check"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("listed twice"),
        "duplicate phase not reported:\n{out}"
    );
    assert!(
        out.contains("rules/missing.rhai does not exist"),
        "missing rule file not reported:\n{out}"
    );
    assert!(
        out.contains("rules/c.rhai:1:1: ") && out.contains("lib/does_not_exist"),
        "bad import not reported:\n{out}"
    );
    assert!(out.contains("3 problem(s) found"), "{out}");
}

#[test]
fn check_refuses_imports_from_outside_the_rules_folder() {
    let outside = tempfile::tempdir().unwrap();
    let secret_abs = outside.path().join("secret.rhai");
    std::fs::write(&secret_abs, "fn f() { 1 }\n").unwrap();
    let abs = secret_abs.with_extension("");
    let abs = abs.to_str().unwrap();
    let cases: Vec<String> = vec![
        "../secret".into(),
        "lib/../../secret".into(),
        abs.into(),
        format!("{abs}.rhai"),
        "lib/link".into(), // a symlink under rules/lib pointing outside
    ];
    for path in &cases {
        let rule = format!("import \"{path}\" as s;\nfn phase(customer) {{ \"a\" }}\n");
        let sb = Sandbox::custom(CALM, &[("x", &rule, &["a"])]);
        sb.write("secret.rhai", "fn f() { 1 }\n");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&secret_abs, sb.path().join("rules/lib/link.rhai")).unwrap();
        let o = sb.run(&["check"]);
        let out = stdout(&o);
        assert_eq!(code(&o), 1, "import {path:?} was accepted:\n{out}");
        assert!(
            out.contains("rules/x.rhai:1:1: "),
            "import {path:?}:\n{out}"
        );
        // And nothing that needs the rules runs.
        let o = sb.run_stdin(&["eval", "--now", NOW], Some("{\"id\": \"c1\"}\n"));
        assert_eq!(code(&o), 1, "eval ran with import {path:?}: {}", stdout(&o));
        assert_eq!(stdout(&o), "");
    }
}

#[test]
fn check_refuses_eval() {
    let sb = Sandbox::custom(
        CALM,
        &[(
            "x",
            "fn phase(customer) {\n    eval(\"\\\"a\\\"\")\n}\n",
            &["a"],
        )],
    );
    let o = sb.run(&["check"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("rules/x.rhai:2:5: ") && out.contains("eval"),
        "{out}"
    );
    let o = sb.run_stdin(&["eval", "--now", NOW], Some("{\"id\": \"c1\"}\n"));
    assert_eq!(code(&o), 1);
    assert_eq!(stdout(&o), "", "eval ran a rule that calls eval()");
}

#[test]
fn a_loop_in_a_helper_module_does_not_hang_check() {
    let sb = Sandbox::custom(
        "[rules]\nmax_operations = 1000000000000\ntimeout_ms = 100\n",
        &[(
            "x",
            "import \"lib/spin\" as spin;\nfn phase(customer) { \"a\" }\n",
            &["a"],
        )],
    );
    sb.write("rules/lib/spin.rhai", "loop {}\nfn f() { 1 }\n");
    let o = sb.run_watchdog(&["check"], None, WATCHDOG);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("rules/lib/spin.rhai:1:"),
        "{}",
        stdout(&o)
    );
}

// -------------------------------------------------------------------------- test

#[test]
fn test_runs_the_shipped_rule_tests_and_they_pass() {
    let sb = Sandbox::shipped();
    let o = sb.run(&["test"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}{}", stderr(&o));
    let last = out.lines().last().unwrap_or("");
    let n: usize = last
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last line is not `N passed, 0 failed`: {last:?}"));
    assert!(n >= 40, "only {n} rule tests");
}

#[test]
fn test_prints_each_failure_with_expected_and_actual() {
    let sb = Sandbox::custom(
        CALM,
        &[(
            "j",
            "fn phase(customer) {\n    if customer.vip ?? false { \"b\" } else { \"a\" }\n}\n",
            &["a", "b"],
        )],
    );
    let file = sb.write(
        "cases.toml",
        "[[cases]]\nname = \"right\"\njourney = \"j\"\nnow = \"2026-11-20T12:00:00Z\"\nexpect = \"a\"\n[cases.customer]\nid = \"t1\"\n\n\
         [[cases]]\nname = \"wrong on purpose\"\njourney = \"j\"\nnow = \"2026-11-20T12:00:00Z\"\nexpect = \"a\"\n[cases.customer]\nid = \"t2\"\nvip = true\n\n\
         [[cases]]\nname = \"none expected\"\njourney = \"j\"\nnow = \"2026-11-20T12:00:00Z\"\nexpect_none = true\n[cases.customer]\nid = \"t3\"\n",
    );
    let o = sb.run(&["test", file.to_str().unwrap()]);
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fails.len(), 2, "{out}");
    assert!(
        fails[0].contains("cases.toml:9 ") && fails[0].contains("\"wrong on purpose\""),
        "{out}"
    );
    assert!(fails[0].ends_with("expected a, got b"), "{out}");
    assert!(
        fails[1].contains("\"none expected\"") && fails[1].ends_with("expected no phase, got a"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("1 passed, 2 failed"), "{out}");
}

// -------------------------------------------------------------------------- eval

/// A rule file whose `phase` is "yes" when `check` (the given body) is true.
fn predicate_rule(body: &str) -> String {
    format!("fn check(customer) {{\n    {body}\n}}\n\nfn phase(customer) {{\n    if check(customer) {{ \"yes\" }} else {{ \"no\" }}\n}}\n")
}

#[test]
fn eval_helpers_follow_the_rule_contract() {
    let t = |days: f64| -> String {
        let secs = NOW_UNIX - (days * 86_400.0).round() as i64;
        chrono::DateTime::from_timestamp(secs, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let ev = |kind: &str, at: &str| json!({"kind": kind, "at": at});
    let visits = json!({"events": [ev("visit", &t(1.0)), ev("order", &t(1.0)), ev("visit", &t(10.0)), ev("visit", &t(400.0))]});
    let orders = json!({"events": [
        {"kind": "order", "at": t(10.0), "data": {"n": 1}},
        {"kind": "order", "at": "2026-11-18T12:00:00Z", "data": {"n": 2, "total": 59.5}},
        {"kind": "order", "at": t(15.0), "data": {"n": 3}},
        {"kind": "visit", "at": t(0.5), "data": {"n": 4}},
    ]});
    // (what, body of `check(customer)`, customer, expected phase)
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("now() is the --now time in unix seconds", "now() == 1795176000", json!({}), "yes"),
        ("now() is an integer", "type_of(now()) == \"i64\"", json!({}), "yes"),
        ("days_since RFC 3339", "days_since(\"2026-11-18T12:00:00Z\") == 2.0", json!({}), "yes"),
        ("days_since is fractional", "days_since(\"2026-11-20T00:00:00Z\") == 0.5", json!({}), "yes"),
        ("days_since with an offset", "days_since(\"2026-11-18T13:00:00+01:00\") == 2.0", json!({}), "yes"),
        ("days_since unix seconds", "days_since(now() - 3 * 86400) == 3.0", json!({}), "yes"),
        ("days_since a unix literal", "days_since(1795132800) == 0.5", json!({}), "yes"),
        ("days_since is a float", "type_of(days_since(now())) == \"f64\"", json!({}), "yes"),
        ("days_since is not off by one", "days_since(\"2026-11-18T12:00:00Z\") > 2.0", json!({}), "no"),
        ("hours_since RFC 3339", "hours_since(\"2026-11-20T09:00:00Z\") == 3.0", json!({}), "yes"),
        ("hours_since is fractional", "hours_since(\"2026-11-20T11:30:00Z\") == 0.5", json!({}), "yes"),
        ("hours_since with an offset", "hours_since(\"2026-11-20T10:00:00+01:00\") == 3.0", json!({}), "yes"),
        ("hours_since unix seconds", "hours_since(now() - 5400) == 1.5", json!({}), "yes"),
        ("count_events of a kind, any time", "count_events(customer, \"visit\") == 3", visits.clone(), "yes"),
        ("count_events of an absent kind", "count_events(customer, \"refund\") == 0", visits.clone(), "yes"),
        ("count_events without events", "count_events(customer, \"visit\") == 0", json!({}), "yes"),
        ("count_events within days", "count_events(customer, \"visit\", 7) == 1", visits.clone(), "yes"),
        ("count_events within many days", "count_events(customer, \"visit\", 400) == 3", visits.clone(), "yes"),
        (
            "count_events: exactly within_days is included",
            "count_events(customer, \"visit\", 7) == 1",
            json!({"events": [ev("visit", "2026-11-13T12:00:00Z")]}),
            "yes",
        ),
        (
            "count_events: a second more is not",
            "count_events(customer, \"visit\", 7) == 0",
            json!({"events": [ev("visit", "2026-11-13T11:59:59Z")]}),
            "yes",
        ),
        (
            "count_events: fractional window, boundary included",
            "count_events(customer, \"visit\", 0.5) == 1",
            json!({"events": [ev("visit", "2026-11-20T00:00:00Z")]}),
            "yes",
        ),
        (
            "count_events: fractional window, a second more",
            "count_events(customer, \"visit\", 0.5) == 0",
            json!({"events": [ev("visit", "2026-11-19T23:59:59Z")]}),
            "yes",
        ),
        (
            "count_events: window 0 counts an event at now",
            "count_events(customer, \"visit\", 0) == 1",
            json!({"events": [ev("visit", NOW)]}),
            "yes",
        ),
        (
            "count_events: unix-seconds event times",
            "count_events(customer, \"visit\", 2) == 1 && count_events(customer, \"visit\", 1) == 0",
            json!({"events": [{"kind": "visit", "at": NOW_UNIX - 86_400 - 1}]}),
            "yes",
        ),
        ("last_event is the latest by time", "last_event(customer, \"order\").data.n == 2", orders.clone(), "yes"),
        (
            "last_event is the whole event",
            "let e = last_event(customer, \"order\"); e.kind == \"order\" && e.at == \"2026-11-18T12:00:00Z\" && e.data.total == 59.5",
            orders.clone(),
            "yes",
        ),
        (
            "last_event compares times, not text",
            "last_event(customer, \"order\").data.n == 1",
            json!({"events": [
                {"kind": "order", "at": "2026-11-18T14:00:00+01:00", "data": {"n": 1}},
                {"kind": "order", "at": "2026-11-18T12:30:00Z", "data": {"n": 2}},
            ]}),
            "yes",
        ),
        ("last_event of an absent kind is ()", "last_event(customer, \"refund\") == ()", orders.clone(), "yes"),
        ("last_event without events is ()", "last_event(customer, \"order\") == ()", json!({}), "yes"),
        ("has_tag: array, case and spaces", "has_tag(customer, \"vip\")", json!({"tags": ["VIP ", "b"]}), "yes"),
        ("has_tag: comma string", "has_tag(customer, \" vip \")", json!({"tags": "a, Vip ,c"}), "yes"),
        ("has_tag: last of a comma string", "has_tag(customer, \"c\")", json!({"tags": "a, Vip ,C"}), "yes"),
        ("has_tag: absent from a string", "has_tag(customer, \"vip\")", json!({"tags": "a,b"}), "no"),
        ("has_tag: absent from an array", "has_tag(customer, \"vip\")", json!({"tags": ["a", "b"]}), "no"),
        ("has_tag: no substring match", "has_tag(customer, \"vip\")", json!({"tags": ["vipper", "xvip"]}), "no"),
        ("has_tag: no substring match in a string", "has_tag(customer, \"vip\")", json!({"tags": "vipper, xvip"}), "no"),
        ("has_tag: no tags", "has_tag(customer, \"vip\")", json!({}), "no"),
        ("has_tag: empty tags", "has_tag(customer, \"vip\")", json!({"tags": ""}), "no"),
        ("has_tag: Unicode case", "has_tag(customer, \"één\")", json!({"tags": [" ÉÉN"]}), "yes"),
        (
            "attributes are visible",
            "customer.id == \"c1\" && customer.orders_count == 2 && customer.email == \"a@b.nl\" && customer.tags.len() == 1",
            json!({"orders_count": 2, "email": "a@b.nl", "tags": ["vip"]}),
            "yes",
        ),
        ("a missing attribute is ()", "customer.x == () && (customer.x ?? 0) == 0", json!({}), "yes"),
        ("?? keeps a present attribute", "(customer.orders_count ?? 0) == 3", json!({"orders_count": 3}), "yes"),
        ("phase and phase_since are () in eval", "customer.phase == () && customer.phase_since == ()", json!({}), "yes"),
        (
            "events are maps with kind, at and data",
            "let o = customer.events.filter(|e| e.kind == \"order\"); o.len() == 3 && o.all(|e| type_of(e.data) == \"map\" && type_of(e.at) == \"string\")",
            orders.clone(),
            "yes",
        ),
        (
            "an event without data has an empty map",
            "customer.events[0].data.len() == 0",
            json!({"events": [ev("visit", NOW)]}),
            "yes",
        ),
        ("no events is an empty array", "customer.events.len() == 0", json!({}), "yes"),
    ];
    let sb = Sandbox::custom(CALM, &[("j", &predicate_rule("true"), &["yes", "no"])]);
    let mut failures = Vec::new();
    for (what, body, customer, want) in &cases {
        sb.write("rules/j.rhai", &predicate_rule(body));
        let mut customer = customer.clone();
        customer["id"] = json!("c1");
        let o = sb.run_stdin(&["eval", "--now", NOW], Some(&jsonl(&[customer])));
        let expected = json!({"id": "c1", "journey": "j", "phase": want});
        let got = stdout(&o);
        if code(&o) != 0 || got.lines().count() != 1 || parse_json(&got) != expected {
            failures.push(format!(
                "{what}: `{body}`: exit {}, got {} {}",
                code(&o),
                got.trim(),
                stderr(&o).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn eval_prints_one_line_per_customer_and_journey_without_touching_the_store() {
    let sb = Sandbox::shipped();
    let journeys = shipped_journeys(&sb);
    let input = jsonl(&[json!({"id": "e1"}), json!({"id": "e2", "orders_count": 1})]);
    let o = sb.run_stdin(&["eval", "--now", NOW], Some(&input));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 2 * journeys.len());
    for l in &lines {
        let (_, phases) = journeys
            .iter()
            .find(|(n, _)| l["journey"] == **n)
            .expect("a configured journey");
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(keys.starts_with(&["id", "journey", "phase"]), "{l}");
        assert!(
            l["phase"].is_null() || phases.iter().any(|p| l["phase"] == **p),
            "{l}"
        );
    }
    let o = sb.run_stdin(
        &["eval", "--journey", "lifecycle", "--now", NOW],
        Some(&input),
    );
    let lines = json_lines(&stdout(&o));
    assert_eq!(
        lines.iter().map(|l| l["id"].clone()).collect::<Vec<_>>(),
        vec![json!("e1"), json!("e2")]
    );
    assert!(lines.iter().all(|l| l["journey"] == "lifecycle"));
    // Not in the store.
    let o = sb.run(&["explain", "e1", "--now", NOW]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let f = funnel_json(&sb);
    assert!(
        f.as_object()
            .unwrap()
            .values()
            .all(|j| j.as_object().unwrap().values().all(|n| *n == 0)),
        "{f}"
    );
    // An unknown journey is an error, not an empty result.
    let o = sb.run_stdin(&["eval", "--journey", "nope", "--now", NOW], Some(&input));
    assert_eq!(code(&o), 1);
    assert_eq!(stdout(&o), "");
}

#[test]
fn eval_reports_rule_failures_per_customer() {
    // (what, rule file, expected error prefix, more text the error must contain)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("unknown phase", "fn phase(customer) {\n    \"zz\"\n}\n", "rules/j.rhai", "\"zz\", which is not a phase of journey \"j\""),
        ("not a string", "fn phase(customer) {\n    42\n}\n", "rules/j.rhai", "returned"),
        ("division by zero", "fn phase(customer) {\n    let n = customer.n ?? 0;\n    let r = 10 / n;\n    \"a\"\n}\n", "rules/j.rhai:3:", "Division by zero"),
        ("bad time", "fn phase(customer) {\n    if days_since(\"yesterday\") > 1.0 { \"a\" } else { \"b\" }\n}\n", "rules/j.rhai:2:", "yesterday"),
        ("throw", "fn phase(customer) {\n    // comment\n    throw \"boom\";\n}\n", "rules/j.rhai:3:", "boom"),
        ("in a helper module", "import \"lib/util\" as u;\n\nfn phase(customer) {\n    let r = u::ratio(10, customer.n ?? 0);\n    \"a\"\n}\n", "rules/lib/util.rhai:3:", "Division by zero"),
        ("unknown function", "fn phase(customer) {\n    no_such_helper(customer)\n}\n", "rules/j.rhai:2:", "no_such_helper"),
    ];
    let sb = Sandbox::custom(
        CALM,
        &[("j", "fn phase(customer) { \"a\" }\n", &["a", "b"])],
    );
    sb.write(
        "rules/lib/util.rhai",
        "// util\nfn ratio(a, b) {\n    a / b\n}\n",
    );
    let input = jsonl(&[json!({"id": "bad"}), json!({"id": "ok", "n": 2})]);
    for (what, rule, prefix, contains) in cases {
        sb.write("rules/j.rhai", rule);
        let o = sb.run_stdin(&["eval", "--now", NOW], Some(&input));
        assert_eq!(code(&o), 1, "{what}: {}", stdout(&o));
        let lines = json_lines(&stdout(&o));
        assert_eq!(lines.len(), 2, "{what}: {}", stdout(&o));
        let bad = &lines[0];
        assert_eq!(bad["id"], "bad", "{what}");
        assert!(
            bad.get("phase").is_none(),
            "{what}: an error line has no phase: {bad}"
        );
        let err = bad["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error field: {bad}"));
        assert!(
            err.starts_with(prefix) && err.contains(contains),
            "{what}: want {prefix}…{contains} in {err:?}"
        );
        if *what == "division by zero" || *what == "in a helper module" {
            // The rule failed for that customer only.
            assert_eq!(
                lines[1],
                json!({"id": "ok", "journey": "j", "phase": "a"}),
                "{what}"
            );
        }
    }
}

#[test]
fn eval_unit_is_phase_null() {
    let sb = Sandbox::custom(
        CALM,
        &[(
            "j",
            "fn phase(customer) {\n    if customer.member ?? false { \"a\" } else { () }\n}\n",
            &["a"],
        )],
    );
    let o = sb.run_stdin(
        &["eval", "--now", NOW],
        Some(&jsonl(&[
            json!({"id": "n1"}),
            json!({"id": "n2", "member": true}),
        ])),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "{\"id\":\"n1\",\"journey\":\"j\",\"phase\":null}\n{\"id\":\"n2\",\"journey\":\"j\",\"phase\":\"a\"}\n"
    );
}

#[test]
fn eval_imports_helper_modules_under_rules_lib() {
    let rule = "import \"lib/extra/double\" as d;\nimport \"lib/shop\" as shop;\n\nfn phase(customer) {\n    \
                if d::double(customer.n) == 4 && shop::is_buyer(customer) { \"a\" } else { \"b\" }\n}\n";
    let sb = Sandbox::custom(CALM, &[("j", rule, &["a", "b"])]);
    sb.write(
        "rules/lib/extra/double.rhai",
        "fn double(x) {\n    x * 2\n}\n",
    );
    let o = sb.run(&["check"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let input = jsonl(&[
        json!({"id": "m1", "n": 2, "orders_count": 1}),
        json!({"id": "m2", "n": 3, "orders_count": 1}),
    ]);
    let o = sb.run_stdin(&["eval", "--now", NOW], Some(&input));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        json_lines(&stdout(&o)),
        vec![
            json!({"id": "m1", "journey": "j", "phase": "a"}),
            json!({"id": "m2", "journey": "j", "phase": "b"})
        ]
    );
}

#[test]
fn eval_print_and_debug_do_not_reach_stdout() {
    let rule = "fn phase(customer) {\n    print(\"PRINTED-BY-RULE\");\n    debug(\"DEBUGGED-BY-RULE\");\n    \"a\"\n}\n";
    let sb = Sandbox::custom(CALM, &[("j", rule, &["a"])]);
    for verbose in [None, Some("-vv")] {
        let mut args = vec!["eval", "--now", NOW];
        args.extend(verbose);
        let o = sb.run_stdin(&args, Some("{\"id\": \"p1\"}\n"));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "{\"id\":\"p1\",\"journey\":\"j\",\"phase\":\"a\"}\n",
            "{verbose:?}"
        );
    }
}

#[test]
fn eval_a_rule_that_loops_forever_fails_per_customer_and_returns() {
    let rule = "fn phase(customer) {\n    loop {}\n}\n";
    let input = jsonl(
        &(1..=20)
            .map(|i| json!({"id": format!("l{i}")}))
            .collect::<Vec<_>>(),
    );
    // The default operation budget (with a time budget too long to matter), then no
    // operation budget at all (the time budget stops it).
    for (settings, message) in [
        ("[rules]\ntimeout_ms = 60000\n", "operation budget"),
        (
            "[rules]\nmax_operations = 1000000000000\ntimeout_ms = 50\n",
            "time budget",
        ),
    ] {
        let sb = Sandbox::custom(settings, &[("j", rule, &["a"])]);
        let o = sb.run_watchdog(&["eval", "--now", NOW], Some(&input), WATCHDOG);
        assert_eq!(code(&o), 1, "{settings}");
        let lines = json_lines(&stdout(&o));
        assert_eq!(lines.len(), 20, "{settings}: {}", stdout(&o));
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["id"], json!(format!("l{}", i + 1)));
            let err = l["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error: {l}"));
            assert!(
                err.starts_with("rules/j.rhai:2:5: ") && err.contains(message),
                "{settings}: {err}"
            );
        }
        // nurture goes on the same way.
        sb.run_stdin(&["import"], Some(&input));
        let o = sb.run_watchdog(&["nurture", "--json", "--now", NOW], None, WATCHDOG);
        assert_eq!(code(&o), 1);
        let v = parse_json(&stdout(&o));
        assert_eq!(
            (
                v["evaluated"].clone(),
                v["errors"].clone(),
                v["transitions"].clone()
            ),
            (json!(20), json!(20), json!({}))
        );
    }
}

#[test]
fn eval_ten_thousand_generated_customers() {
    const RULE: &str = r#"fn phase(customer) {
    if has_tag(customer, "optout") {
        return ();
    }
    let n = customer.orders_count ?? 0;
    if n == 0 {
        return "new";
    }
    let last = last_event(customer, "order");
    if last == () {
        return "lost";
    }
    let d = days_since(last.at);
    if d <= 30.0 {
        "active"
    } else if d <= 365.0 {
        "lapsing"
    } else {
        "lost"
    }
}
"#;
    let sb = Sandbox::custom(CALM, &[("g", RULE, &["new", "active", "lapsing", "lost"])]);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fmt = |secs: i64| {
        chrono::DateTime::from_timestamp(secs, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let mut input = String::new();
    let mut expected = std::collections::HashMap::new();
    for i in 0..10_000 {
        let id = format!("g{i:05}");
        let r = next();
        let orders = (r % 4) as i64;
        let tags = match (r >> 8) % 16 {
            0 => json!(["OptOut"]),
            1 => json!("nieuwsbrief, optout "),
            2 => json!("nieuwsbrief,optouts"),
            3 => json!(["vip", "opt out"]),
            _ => json!(["nieuwsbrief"]),
        };
        let optout = (r >> 8) % 16 < 2;
        let mut events = Vec::new();
        let mut latest: Option<i64> = None;
        if orders > 0 && (r >> 16) % 10 != 0 {
            for k in 0..(1 + (r >> 20) % 3) {
                let age = match (r >> (24 + 4 * k)) % 8 {
                    0 => 30 * 86_400,
                    1 => 30 * 86_400 + 1,
                    2 => 365 * 86_400,
                    3 => 365 * 86_400 + 1,
                    _ => (next() % (500 * 86_400)) as i64,
                };
                let at = NOW_UNIX - age;
                latest = Some(latest.map_or(at, |l: i64| l.max(at)));
                let at = if k % 2 == 0 {
                    json!(fmt(at))
                } else {
                    json!(at)
                };
                events.push(json!({"kind": "order", "at": at, "data": {"k": k}}));
            }
        }
        // Noise the rule must ignore: a later event of another kind.
        events.push(json!({"kind": "visit", "at": fmt(NOW_UNIX - (next() % 86_400) as i64)}));
        let want = if optout {
            None
        } else if orders == 0 {
            Some("new")
        } else {
            match latest {
                None => Some("lost"),
                Some(at) if NOW_UNIX - at <= 30 * 86_400 => Some("active"),
                Some(at) if NOW_UNIX - at <= 365 * 86_400 => Some("lapsing"),
                Some(_) => Some("lost"),
            }
        };
        let c = json!({"id": id, "orders_count": orders, "tags": tags, "events": events});
        input.push_str(&format!("{c}\n"));
        expected.insert(id.clone(), json!({"id": id, "journey": "g", "phase": want}));
    }
    let per_phase = |p: Option<&str>| expected.values().filter(|v| v["phase"] == json!(p)).count();
    for p in [
        None,
        Some("new"),
        Some("active"),
        Some("lapsing"),
        Some("lost"),
    ] {
        assert!(per_phase(p) > 300, "the generator should cover {p:?}");
    }
    let file = sb.write("gen.jsonl", &input);
    let o = sb.run(&["eval", "--now", NOW, file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 10_000);
    let mut seen = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for l in &lines {
        let id = l["id"].as_str().unwrap_or("").to_string();
        assert!(seen.insert(id.clone()), "{id} printed twice");
        match expected.get(&id) {
            Some(want) if want == l => {}
            want => wrong.push(format!("got {l}, want {want:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong, e.g.:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
}

// ------------------------------------------------------------------------ import

#[test]
fn import_twice_merges_instead_of_duplicating() {
    let sb = Sandbox::custom(CALM, &[("j", "fn phase(customer) { \"a\" }\n", &["a"])]);
    let first = [
        json!({"id": "i1", "email": "i1@example.org", "orders_count": 1, "city": "Delft",
               "events": [{"kind": "order", "at": "2026-11-01T10:00:00Z", "data": {"total": 10}},
                          {"kind": "visit", "at": "2026-10-01T10:00:00Z"}]}),
        json!({"id": "i2", "email": "i2@example.org"}),
        json!({"id": "i3"}),
    ];
    let file = sb.write("first.jsonl", &jsonl(&first));
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "imported 3 customers: 3 new, 0 updated, 0 unchanged; 0 bad lines skipped\n"
    );
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(
        stdout(&o),
        "imported 3 customers: 0 new, 0 updated, 3 unchanged; 0 bad lines skipped\n"
    );
    let o = sb.run(&["import", "--json", file.to_str().unwrap()]);
    let v = parse_json(&stdout(&o));
    assert_eq!(
        (
            v["customers"].clone(),
            v["created"].clone(),
            v["updated"].clone(),
            v["unchanged"].clone(),
            v["errors"].clone()
        ),
        (json!(3), json!(0), json!(0), json!(3), json!(0))
    );
    // New values win, other attributes stay; the same event (also written with another
    // offset) is not repeated; an event with other data is a new event.
    let second = [json!({"id": "i1", "orders_count": 2, "tags": ["vip"],
        "events": [{"kind": "order", "at": "2026-11-01T11:00:00+01:00", "data": {"total": 10}},
                   {"kind": "order", "at": "2026-11-01T10:00:00Z", "data": {"total": 11}},
                   {"kind": "order", "at": "2026-11-05T10:00:00Z"}]})];
    let o = sb.run_stdin(&["import", "-"], Some(&jsonl(&second)));
    assert_eq!(
        stdout(&o),
        "imported 1 customers: 0 new, 1 updated, 0 unchanged; 0 bad lines skipped\n"
    );
    let c = &explain_json(&sb, "i1", NOW)["customer"];
    assert_eq!(c["email"], "i1@example.org");
    assert_eq!(c["city"], "Delft");
    assert_eq!(c["orders_count"], 2);
    assert_eq!(c["tags"], json!(["vip"]));
    let mut events: Vec<String> = c["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e["kind"], e["at"], e["data"]))
        .collect();
    events.sort();
    assert_eq!(
        events,
        vec![
            "\"order\" \"2026-11-01T10:00:00Z\" {\"total\":10}",
            "\"order\" \"2026-11-01T10:00:00Z\" {\"total\":11}",
            "\"order\" \"2026-11-05T10:00:00Z\" {}",
            "\"visit\" \"2026-10-01T10:00:00Z\" {}",
        ]
    );
    // Once more: nothing changes.
    let o = sb.run_stdin(&["import", "-"], Some(&jsonl(&second)));
    assert_eq!(
        stdout(&o),
        "imported 1 customers: 0 new, 0 updated, 1 unchanged; 0 bad lines skipped\n"
    );
    assert_eq!(
        explain_json(&sb, "i1", NOW)["customer"]["events"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let (_, v) = nurture_json(&sb, NOW, &[]);
    assert_eq!(v["evaluated"], 3, "customers counted once: {v}");
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 3}}));
}

#[test]
fn import_csv_types_its_cells() {
    let sb = Sandbox::custom(CALM, &[("j", "fn phase(customer) { \"a\" }\n", &["a"])]);
    let file = sb.write(
        "people.csv",
        "id,orders_count,total_spent,consent_email,city,tags,note,score\n\
         x1,2,123.95,TRUE,Delft,\"vip, nieuw\",\"Jan, de\",-3\n\
         x2,0,0.5,false,,nieuwsbrief,,\n",
    );
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "imported 2 customers: 2 new, 0 updated, 0 unchanged; 0 bad lines skipped\n"
    );
    let mut c = explain_json(&sb, "x1", NOW)["customer"].clone();
    c.as_object_mut().unwrap().remove("events");
    let mut want = json!({"id": "x1", "orders_count": 2, "total_spent": 123.95, "consent_email": true, "city": "Delft",
                          "tags": "vip, nieuw", "note": "Jan, de", "score": -3});
    let sorted = |v: &mut Value| v.as_object_mut().unwrap().sort_keys();
    sorted(&mut c);
    sorted(&mut want);
    assert_eq!(c, want);
    let mut c = explain_json(&sb, "x2", NOW)["customer"].clone();
    sorted(&mut c);
    let mut want = json!({"id": "x2", "orders_count": 0, "total_spent": 0.5, "consent_email": false, "tags": "nieuwsbrief", "events": []});
    sorted(&mut want);
    assert_eq!(c, want, "empty cells are left out");
    // A CSV tags cell works with has_tag.
    sb.write(
        "rules/j.rhai",
        "fn phase(customer) {\n    if has_tag(customer, \"NIEUW\") { \"a\" } else { () }\n}\n",
    );
    nurture_json(&sb, NOW, &[]);
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 1}}));
}

#[test]
fn import_csv_keeps_numbers_with_a_leading_zero_as_text() {
    let sb = Sandbox::custom(CALM, &[("j", "fn phase(customer) { \"a\" }\n", &["a"])]);
    let file = sb.write("people.csv", "id,phone,zip\nx1,0612345678,0123\n");
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let c = &explain_json(&sb, "x1", NOW)["customer"];
    assert_eq!(
        (c["phone"].clone(), c["zip"].clone()),
        (json!("0612345678"), json!("0123"))
    );
}

#[test]
fn import_skips_malformed_lines_and_reports_their_numbers() {
    let sb = Sandbox::custom(CALM, &[("j", "fn phase(customer) { \"a\" }\n", &["a"])]);
    let input = "{\"id\": \"ok1\"}\n{\"id\": \"broken\"\n\n{\"id\": \"ok2\", \"events\": [{\"kind\": \"x\", \"at\": \"yesterday\"}]}\n\
                 [1, 2]\n{\"email\": \"no-id@example.org\"}\n{\"id\": \"ok3\", \"phase\": \"koop\"}\n{\"id\": \"ok4\"}\n";
    let file = sb.write("mixed.jsonl", input);
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        stdout(&o),
        "imported 2 customers: 2 new, 0 updated, 0 unchanged; 5 bad lines skipped\n"
    );
    let err = stderr(&o);
    let numbers: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(numbers, vec!["2", "4", "5", "6", "7"], "{err}");
    for id in ["ok1", "ok4"] {
        assert_eq!(explain_json(&sb, id, NOW)["id"], id);
    }
    // CSV: a row with the wrong number of cells.
    let file = sb.write("mixed.csv", "id,n\nc1,1\nc2,2,extra\nc3,3\n");
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        stdout(&o),
        "imported 2 customers: 2 new, 0 updated, 0 unchanged; 1 bad lines skipped\n"
    );
    assert!(stderr(&o).starts_with("line 3: "), "{}", stderr(&o));
    assert_eq!(explain_json(&sb, "c3", NOW)["customer"]["n"], 3);
}

// ----------------------------------------------------------------------- nurture

const NURTURE_RULE: &str = r#"fn phase(customer) {
    let visits = count_events(customer, "visit");
    if visits == 0 {
        return ();
    }
    if customer.phase == "b" && days_since(customer.phase_since) >= 7.0 {
        return "c";
    }
    if customer.phase == "c" {
        return "c";
    }
    if visits == 1 {
        return "a";
    }
    return "b";
}
"#;

const T1: &str = "2026-11-01T00:00:00Z";
const T2: &str = "2026-11-03T00:00:00Z";
const T3: &str = "2026-11-10T00:00:00Z";

fn nurture_sandbox() -> Sandbox {
    let sb = Sandbox::custom(CALM, &[("j", NURTURE_RULE, &["a", "b", "c"])]);
    import_stdin(
        &sb,
        &[
            json!({"id": "n1", "events": [{"kind": "visit", "at": "2026-10-31T00:00:00Z"}]}),
            json!({"id": "n2", "events": [{"kind": "visit", "at": "2026-10-31T00:00:00Z"}, {"kind": "visit", "at": "2026-10-30T00:00:00Z"}]}),
            json!({"id": "n3"}),
        ],
    );
    sb
}

fn history(sb: &Sandbox, id: &str) -> Vec<(Value, Value, Value)> {
    let x = explain_json(sb, id, T3);
    journey_of(&x, "j")["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["from"].clone(), t["to"].clone(), t["at"].clone()))
        .collect()
}

#[test]
fn nurture_records_transitions_that_explain_shows_in_order() {
    let sb = nurture_sandbox();
    let (c, v) = nurture_json(&sb, T1, &[]);
    assert_eq!(c, 0);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in ["evaluated", "transitions", "errors"] {
        assert!(keys.contains(&k), "no {k} in {v}");
    }
    assert_eq!(
        (v["evaluated"].clone(), v["errors"].clone()),
        (json!(3), json!(0))
    );
    assert_eq!(v["transitions"], json!({"j": {"-→a": 1, "-→b": 1}}));
    // A new event for n1 (and n2 imported again, unchanged).
    import_stdin(
        &sb,
        &[
            json!({"id": "n1", "events": [{"kind": "visit", "at": "2026-11-02T00:00:00Z"}]}),
            json!({"id": "n2", "events": [{"kind": "visit", "at": "2026-10-31T00:00:00Z"}]}),
        ],
    );
    let (_, v) = nurture_json(&sb, T2, &[]);
    assert_eq!(v["transitions"], json!({"j": {"a→b": 1}}));
    // The same time again: nothing new.
    let (c, v) = nurture_json(&sb, T2, &[]);
    assert_eq!(
        (c, v["evaluated"].clone(), v["transitions"].clone()),
        (0, json!(3), json!({}))
    );
    // phase_since is when the phase was entered: n1 entered b at T2, n2 at T1; both are
    // 7+ days in b at T3.
    let (_, v) = nurture_json(&sb, T3, &[]);
    assert_eq!(v["transitions"], json!({"j": {"b→c": 2}}));

    let null = Value::Null;
    assert_eq!(
        history(&sb, "n1"),
        vec![
            (null.clone(), json!("a"), json!(T1)),
            (json!("a"), json!("b"), json!(T2)),
            (json!("b"), json!("c"), json!(T3))
        ]
    );
    assert_eq!(
        history(&sb, "n2"),
        vec![
            (null.clone(), json!("b"), json!(T1)),
            (json!("b"), json!("c"), json!(T3))
        ]
    );
    assert_eq!(history(&sb, "n3"), vec![]);
    let x = explain_json(&sb, "n1", T3);
    let j = journey_of(&x, "j");
    assert_eq!(
        (j["phase"].clone(), j["since"].clone()),
        (json!("c"), json!(T3))
    );
    let versions: Vec<&Value> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["rules_version"])
        .collect();
    assert!(
        versions[0].as_str().is_some_and(|s| !s.is_empty()),
        "{versions:?}"
    );
    assert!(
        versions.iter().all(|v| *v == versions[0]),
        "rules unchanged, one version: {versions:?}"
    );
    for t in j["history"].as_array().unwrap() {
        assert_eq!(t["journey"], "j");
    }
    // The human form shows the same history.
    let o = sb.run(&["explain", "n1", "--now", T3]);
    let out = stdout(&o);
    let hist: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("2026-"))
        .map(str::trim)
        .collect();
    assert_eq!(hist.len(), 3, "{out}");
    assert!(hist[0].starts_with(&format!("{T1}  - → a")), "{out}");
    assert!(hist[1].starts_with(&format!("{T2}  a → b")), "{out}");
    assert!(hist[2].starts_with(&format!("{T3}  b → c")), "{out}");
    assert!(out.contains(&format!("j: c since {T3}")), "{out}");
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 0, "b": 0, "c": 2}}));
}

#[test]
fn nurture_dry_run_writes_nothing() {
    let sb = nurture_sandbox();
    nurture_json(&sb, T1, &[]);
    import_stdin(
        &sb,
        &[json!({"id": "n1", "events": [{"kind": "visit", "at": "2026-11-02T00:00:00Z"}]})],
    );
    let funnel_before = funnel_json(&sb);
    assert_eq!(funnel_before, json!({"j": {"a": 1, "b": 1, "c": 0}}));
    let (c, v) = nurture_json(&sb, T2, &["--dry-run"]);
    assert_eq!(c, 0);
    assert_eq!(
        v["transitions"],
        json!({"j": {"a→b": 1}}),
        "a dry run still reports what it would do"
    );
    assert_eq!(v["dry_run"], json!(true));
    assert_eq!(funnel_json(&sb), funnel_before);
    assert_eq!(history(&sb, "n1").len(), 1);
    let o = sb.run(&["nurture", "--dry-run", "--now", T2]);
    assert!(stdout(&o).starts_with("dry run: "), "{}", stdout(&o));
    assert_eq!(funnel_json(&sb), funnel_before);
    // The real run then records it.
    let (_, v) = nurture_json(&sb, T2, &[]);
    assert_eq!(v["transitions"], json!({"j": {"a→b": 1}}));
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 0, "b": 2, "c": 0}}));
    assert_eq!(history(&sb, "n1").len(), 2);
}

#[test]
fn nurture_reports_rule_errors_and_goes_on() {
    let rule = "fn phase(customer) {\n    if customer.id == \"bad\" {\n        throw \"no\";\n    }\n    \"a\"\n}\n";
    let sb = Sandbox::custom(CALM, &[("j", rule, &["a"])]);
    import_stdin(&sb, &[json!({"id": "bad"}), json!({"id": "good"})]);
    let o = sb.run(&["nurture", "--now", NOW]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("rule error: customer bad, journey j: rules/j.rhai:3:"),
        "{}",
        stderr(&o)
    );
    assert!(
        stdout(&o).contains("1 transitions, 1 rule errors"),
        "{}",
        stdout(&o)
    );
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 1}}));
}

#[test]
fn rules_version_changes_when_the_rule_changes() {
    let sb = nurture_sandbox();
    nurture_json(&sb, T1, &[]);
    import_stdin(
        &sb,
        &[json!({"id": "n1", "events": [{"kind": "visit", "at": "2026-11-02T00:00:00Z"}]})],
    );
    sb.write("rules/j.rhai", &format!("// edited\n{NURTURE_RULE}"));
    nurture_json(&sb, T2, &[]);
    let x = explain_json(&sb, "n1", T2);
    let h = journey_of(&x, "j")["history"].as_array().unwrap().clone();
    assert_eq!(h.len(), 2);
    assert_ne!(h[0]["rules_version"], h[1]["rules_version"]);
}

#[test]
fn rules_version_does_not_depend_on_where_the_rules_are() {
    let version = || {
        let sb = nurture_sandbox();
        nurture_json(&sb, T1, &[]);
        let x = explain_json(&sb, "n1", T1);
        journey_of(&x, "j")["history"][0]["rules_version"].clone()
    };
    assert_eq!(version(), version());
}

// ------------------------------------------------------------------ explain, funnel

#[test]
fn explain_shows_the_rule_lines_that_ran() {
    let sb = Sandbox::shipped();
    import_stdin(
        &sb,
        &[
            json!({"id": "x1", "email": "x1@example.org", "orders_count": 1,
                 "events": [{"kind": "order_created", "at": "2026-10-01T10:00:00Z"},
                            {"kind": "product_view", "at": "2026-11-18T10:00:00Z"}]}),
        ],
    );
    nurture_json(&sb, NOW, &[]);
    let o = sb.run(&["explain", "x1", "--now", NOW]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(out.starts_with("customer x1 <x1@example.org>"), "{out}");
    let traced = out.lines().filter(|l| {
        l.trim_start()
            .strip_prefix("rules/5k.rhai:")
            .is_some_and(|rest| {
                rest.split_whitespace()
                    .next()
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
    });
    assert!(
        traced.count() >= 2,
        "no trace lines of rules/5k.rhai in\n{out}"
    );
    assert!(out.contains("history:"), "{out}");
    let x = explain_json(&sb, "x1", NOW);
    assert_eq!(x["evaluated_at"], NOW);
    let journeys = shipped_journeys(&sb);
    assert_eq!(x["journeys"].as_array().unwrap().len(), journeys.len());
    for (name, _) in &journeys {
        let j = journey_of(&x, name);
        let trace = j["trace"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no trace array"));
        assert!(!trace.is_empty(), "{name}: empty trace");
        // Each line names its file and line, and shows that line's text.
        for t in trace {
            let source = t["source"].as_str().unwrap();
            let line = t["line"].as_u64().unwrap() as usize;
            let text = std::fs::read_to_string(sb.path().join(source))
                .unwrap_or_else(|_| panic!("{source}"));
            assert_eq!(
                t["text"].as_str().unwrap(),
                text.lines().nth(line - 1).unwrap().trim(),
                "{source}:{line}"
            );
        }
        assert_eq!(
            j["evaluation"]["phase"], j["phase"],
            "{name}: stored and evaluated phase at the same now"
        );
        assert_eq!(
            j["history"].as_array().unwrap().len(),
            usize::from(!j["phase"].is_null()),
            "{name}"
        );
    }
}

/// The line numbers `explain --json` traces in journey `j` of customer `id`.
fn traced_lines(sb: &Sandbox, id: &str) -> Vec<u64> {
    let x = explain_json(sb, id, NOW);
    journey_of(&x, "j")["trace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["line"].as_u64().unwrap())
        .collect()
}

#[test]
fn explain_traces_the_decisive_branch() {
    // Explicit returns that are not the last statement (see the ignored test below).
    let rule = "fn phase(customer) {\n    let n = customer.orders_count ?? 0;\n    if n > 5 {\n        return \"b\";\n    }\n    \
                if n > 0 {\n        return \"a\";\n    }\n    ()\n}\n";
    let sb = Sandbox::custom(CALM, &[("j", rule, &["a", "b"])]);
    import_stdin(
        &sb,
        &[
            json!({"id": "few", "orders_count": 1}),
            json!({"id": "many", "orders_count": 9}),
        ],
    );
    let few = traced_lines(&sb, "few");
    let many = traced_lines(&sb, "many");
    assert_eq!(few, vec![2, 3, 6, 7]);
    assert_eq!(many, vec![2, 3, 4]);
    let o = sb.run(&["explain", "few", "--now", NOW]);
    assert!(
        stdout(&o).contains("    rules/j.rhai:7    return \"a\";\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_traces_an_implicit_result() {
    let if_else = "fn phase(customer) {\n    let n = customer.orders_count ?? 0;\n    if n > 5 {\n        \"b\"\n    } else {\n        \"a\"\n    }\n}\n";
    let final_return = "fn phase(customer) {\n    let n = customer.orders_count ?? 0;\n    if n > 5 {\n        return \"b\";\n    }\n    return \"a\";\n}\n";
    for rule in [if_else, final_return] {
        let sb = Sandbox::custom(CALM, &[("j", rule, &["a", "b"])]);
        import_stdin(
            &sb,
            &[
                json!({"id": "few", "orders_count": 1}),
                json!({"id": "many", "orders_count": 9}),
            ],
        );
        let few = traced_lines(&sb, "few");
        let many = traced_lines(&sb, "many");
        assert!(
            few.contains(&6) && !few.contains(&4),
            "few: {few:?} in\n{rule}"
        );
        assert!(
            many.contains(&4) && !many.contains(&6),
            "many: {many:?} in\n{rule}"
        );
    }
}

#[test]
fn funnel_counts_every_phase_as_nurture_left_them() {
    let sb = Sandbox::shipped_with_examples();
    let file = sb.path().join("examples/customers.jsonl");
    let n = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let o = sb.run(&["import", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (c, v) = nurture_json(&sb, NOW, &[]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["evaluated"], json!(n));
    let funnel = funnel_json(&sb);
    let journeys = shipped_journeys(&sb);
    assert_eq!(
        funnel.as_object().unwrap().keys().collect::<Vec<_>>(),
        journeys.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (name, phases) in &journeys {
        let f = funnel[name].as_object().unwrap();
        assert_eq!(
            f.keys().collect::<Vec<_>>(),
            phases.iter().collect::<Vec<_>>(),
            "{name}: every phase, in order"
        );
        for label in v["transitions"][name]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            assert!(
                label.starts_with("-→"),
                "a first nurture only enters phases: {label}"
            );
        }
        for p in phases {
            let entered = v["transitions"][name][format!("-→{p}")]
                .as_u64()
                .unwrap_or(0);
            assert_eq!(f[p], json!(entered), "{name}/{p}");
        }
    }
    let lifecycle: u64 = funnel["lifecycle"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(
        lifecycle, n as u64,
        "every customer has a phase in the default journey"
    );
    // The human chart shows the same numbers.
    let o = sb.run(&["funnel"]);
    let out = stdout(&o);
    assert!(out.contains(&format!("lifecycle ({n} customers)")), "{out}");
    for (name, phases) in &journeys {
        for p in phases {
            let want = funnel[name][p].as_u64().unwrap();
            assert!(
                out.lines()
                    .any(|l| l.trim_start().starts_with(p.as_str())
                        && l.ends_with(&format!(" {want}"))),
                "{name}/{p} {want} not in\n{out}"
            );
        }
    }
}

// ------------------------------------------------------------------------ forget

const SECRET_EMAIL: &str = "zeldzaam-7q3x9k@example.org";

fn forget_sandbox() -> Sandbox {
    let sb = Sandbox::custom(
        CALM,
        &[(
            "j",
            "fn phase(customer) {\n    if customer.vip ?? false { \"b\" } else { \"a\" }\n}\n",
            &["a", "b"],
        )],
    );
    import_stdin(
        &sb,
        &[
            json!({"id": "f1", "email": SECRET_EMAIL, "vip": true, "events": [{"kind": "visit", "at": "2026-11-01T00:00:00Z"}]}),
            json!({"id": "f2", "email": "f2@example.org"}),
            json!({"id": "f3", "vip": true}),
        ],
    );
    nurture_json(&sb, T1, &[]);
    import_stdin(&sb, &[json!({"id": "f1", "vip": false})]);
    nurture_json(&sb, T2, &[]);
    assert_eq!(history(&sb, "f1").len(), 2);
    sb
}

#[test]
fn forget_leaves_no_trace_of_the_customer() {
    let sb = forget_sandbox();
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 2, "b": 1}}));
    let o = sb.run(&["forget", "f1"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = sb.run(&["explain", "f1", "--now", NOW]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("no customer \"f1\""), "{}", stdout(&o));
    let o = sb.run(&["explain", "f1", "--json", "--now", NOW]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        parse_json(&stdout(&o)),
        json!({"id": "f1", "error": "no such customer"})
    );
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 1, "b": 1}}));
    let (_, v) = nurture_json(&sb, T2, &[]);
    assert_eq!(
        (v["evaluated"].clone(), v["transitions"].clone()),
        (json!(2), json!({}))
    );
    // Other customers are untouched.
    assert_eq!(history(&sb, "f2").len(), 1);
    // New customers still import, also one with the forgotten address; and the
    // forgotten id comes back as a new customer with no history.
    let out = import_stdin(
        &sb,
        &[
            json!({"id": "f4", "email": SECRET_EMAIL}),
            json!({"id": "f5"}),
        ],
    );
    assert!(out.contains(" 2 new,"), "{out}");
    let out = import_stdin(&sb, &[json!({"id": "f1"})]);
    assert!(out.contains(" 1 new,"), "{out}");
    let x = explain_json(&sb, "f1", NOW);
    assert_eq!(x["customer"], json!({"id": "f1", "events": []}));
    let j = journey_of(&x, "j");
    assert_eq!(
        (j["phase"].clone(), j["history"].clone()),
        (Value::Null, json!([]))
    );
    let (_, v) = nurture_json(&sb, T3, &[]);
    assert_eq!(v["evaluated"], json!(5));
    assert_eq!(funnel_json(&sb), json!({"j": {"a": 4, "b": 1}}));
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if std::fs::read(&p)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            out.push(p);
        }
    }
    out
}

#[test]
fn forget_leaves_no_bytes_in_the_store_files() {
    let sb = forget_sandbox();
    let store = sb.path().join("data/klantreis");
    assert!(
        !files_containing(&store, SECRET_EMAIL.as_bytes()).is_empty(),
        "the test should see the email before forget"
    );
    let o = sb.run(&["forget", "f1"]);
    assert_eq!(code(&o), 0);
    let left = files_containing(&store, SECRET_EMAIL.as_bytes());
    assert!(left.is_empty(), "the forgotten email is still in {left:?}");
}

// ------------------------------------------------------------------ usage, demo

#[test]
fn wrong_usage_exits_2() {
    let sb = Sandbox::shipped();
    let cases: &[&[&str]] = &[
        &["frobnicate"],
        &[],
        &["nurture", "--bogus"],
        &["import", "--format", "xml", "x.jsonl"],
        &["explain"],
        &["eval", "--journey"],
        &["check", "extra"],
        &["funnel", "--json=maybe"],
    ];
    for args in cases {
        let o = sb.run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
        assert!(!stderr(&o).is_empty(), "{args:?}");
    }
    assert!(
        !sb.path().join("data").exists(),
        "wrong usage touched the store"
    );
}

#[test]
fn demo_prints_a_funnel_and_does_not_duplicate_customers() {
    let sb = Sandbox::shipped_with_examples();
    let n = std::fs::read_to_string(sb.path().join("examples/customers.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let o = sb.run(&["demo"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "imported {n} customers: {n} new, 0 updated, 0 unchanged"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("lifecycle ({n} customers)")), "{out}");
    for (_, phases) in shipped_journeys(&sb) {
        for p in phases {
            assert!(
                out.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{p} "))),
                "no bar for {p} in\n{out}"
            );
        }
    }
    let funnel = funnel_json(&sb);
    let o = sb.run(&["demo"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "imported {n} customers: 0 new, 0 updated, {n} unchanged"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("lifecycle ({n} customers)")), "{out}");
    assert_eq!(funnel_json(&sb), funnel, "a second demo changes nothing");
}
