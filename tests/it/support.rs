//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where config.toml and rules/ live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The built `klantreis` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_klantreis"))
}

/// A temp folder with a copy of the shipped rules and a config whose store lives
/// in the folder; the CLI runs against it.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// The shipped config and rules, with a fresh store.
    pub fn shipped() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repo().join("rules"), &dir.path().join("rules"));
        std::fs::copy(repo().join("config.toml"), dir.path().join("config.toml"))
            .expect("copy config");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Runs `klantreis --config <sandbox config> args...`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    /// Like [`Sandbox::run`], feeding `stdin`.
    pub fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.path());
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn klantreis");
        {
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                // A command that fails early (a bad rule) may exit before reading
                // its stdin: a broken pipe then is its answer, not the test's error.
                match si.write_all(s.as_bytes()) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    r => r.unwrap(),
                }
            }
        }
        child.wait_with_output().expect("wait for klantreis")
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---- Added for tests/it/cli.rs ----

impl Sandbox {
    /// The shipped config and rules plus a copy of `examples/` (for `demo`).
    pub fn shipped_with_examples() -> Self {
        let sb = Self::shipped();
        copy_dir(&repo().join("examples"), &sb.path().join("examples"));
        sb
    }

    /// A sandbox with the shipped rules folder (so `rules/lib` is there) and a config
    /// with only the given journeys `(name, rule file text, phases)`; each rule is
    /// written to `rules/<name>.rhai`. `rules_section` is put in verbatim (e.g.
    /// `"[rules]\nmax_operations = 0\n"`, or `""` for the defaults).
    pub fn custom(rules_section: &str, journeys: &[(&str, &str, &[&str])]) -> Self {
        let sb = Self::shipped();
        sb.write("config.toml", &custom_config(rules_section, journeys));
        for (name, rule, _) in journeys {
            sb.write(&format!("rules/{name}.rhai"), rule);
        }
        sb
    }

    /// Like [`Sandbox::run_stdin`], but stdin is written and stdout/stderr are read on
    /// their own threads (so large inputs and outputs cannot deadlock), and the process
    /// is killed (and the test fails) when it has not finished within `limit`. Only for
    /// commands that might hang; no test asserts on how long anything takes.
    pub fn run_watchdog(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        limit: std::time::Duration,
    ) -> Output {
        use std::io::{Read, Write};
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.path());
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn klantreis");
        let mut si = child.stdin.take().unwrap();
        let input = stdin.unwrap_or("").to_string();
        let writer = std::thread::spawn(move || {
            let _ = si.write_all(input.as_bytes());
        });
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for klantreis") {
                break s;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("klantreis {args:?} did not finish within {limit:?}: it hangs");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = writer.join();
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

/// The config text [`Sandbox::custom`] writes.
pub fn custom_config(rules_section: &str, journeys: &[(&str, &str, &[&str])]) -> String {
    let mut cfg = String::from("[store]\npath = \"data/klantreis\"\n\n");
    cfg.push_str(rules_section);
    for (name, _, phases) in journeys {
        let phases: Vec<String> = phases.iter().map(|p| format!("\"{p}\"")).collect();
        cfg.push_str(&format!(
            "\n[[journeys]]\nname = \"{name}\"\nrules = \"rules/{name}.rhai\"\nphases = [{}]\n",
            phases.join(", ")
        ));
    }
    cfg
}

/// The exit code (-1 when killed by a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Every non-empty line of `text` parsed as JSON; panics on a line that is not JSON.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}
