//! The fake Kubernetes API server of the agent's tests as a program, so the
//! agent binary can be tried (and attacked) by hand without a cluster:
//!
//!     fake_api PORT OBJECTS.json [EXEC_RULES.json]
//!
//! OBJECTS.json is a JSON array of Kubernetes objects (pods, PVCs, PVs,
//! ...), loaded as if applied. EXEC_RULES.json is a JSON array of
//! `{"match": "text in the command line", "result": R}` where R is `"ok"`,
//! `"exit:CODE"`, `"hang"` or `"delay:SECONDS"`; other commands succeed.
//! Point the agent at it with a kubeconfig whose server is
//! `http://127.0.0.1:PORT`. Objects the agent writes (Events, status
//! ConfigMaps, Leases) are read back with plain GETs, e.g.
//! `curl 127.0.0.1:PORT/api/v1/namespaces/default/events`; every exec is
//! printed to stdout as it happens.

use std::time::Duration;

use marmoset_testing::fake_api::{ExecResult, FakeApi};
use serde_json::Value;

fn usage() -> ! {
    eprintln!("usage: fake_api PORT OBJECTS.json [EXEC_RULES.json]");
    std::process::exit(2);
}

fn read_json(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(2)
    });
    serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(2)
    })
}

fn exec_result(r: &str) -> Option<ExecResult> {
    let (kind, arg) = r.split_once(':').unwrap_or((r, ""));
    Some(match kind {
        "ok" => ExecResult::Ok(String::new()),
        "hang" => ExecResult::Hang,
        "exit" => ExecResult::Exit(arg.parse().ok()?, format!("exit {arg}")),
        "delay" => ExecResult::Delay(Duration::from_secs(arg.parse().ok()?), String::new()),
        _ => return None,
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        usage();
    }
    let port: u16 = args[1].parse().unwrap_or_else(|_| usage());
    let objects = read_json(&args[2]);
    let rules = args.get(3).map(|p| read_json(p));
    let api = FakeApi::start_on(port).await;
    api.with(|s| {
        for o in objects.as_array().cloned().unwrap_or_default() {
            s.add(o);
        }
        for r in rules
            .as_ref()
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let (Some(m), Some(res)) = (r["match"].as_str(), r["result"].as_str()) else {
                eprintln!("exec rule {r} needs \"match\" and \"result\"");
                std::process::exit(2);
            };
            let Some(res) = exec_result(res) else {
                eprintln!("exec rule {r}: result is ok, exit:N, hang or delay:SECONDS");
                std::process::exit(2);
            };
            s.exec_rules.push((m.to_string(), res));
        }
    });
    println!("fake Kubernetes API on http://{}", api.addr);
    let mut printed = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let execs = api.with(|s| s.execs[printed..].to_vec());
        for e in &execs {
            println!(
                "exec {}/{} [{}]: {}",
                e.namespace,
                e.pod,
                e.container,
                e.command.join(" ")
            );
        }
        printed += execs.len();
    }
}
