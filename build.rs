//! Build script: the git commit the binary is built from, for `pgfeed --version` and the
//! start-up log line, as the compile-time variable `BUILD_GIT_COMMIT` (not `PGFEED_`:
//! `cargo test` also sets it in the tests' environment, where the gateway would warn about
//! a `PGFEED_` variable that names no setting).
//!
//! `PGFEED_GIT_COMMIT` from the environment wins (the Dockerfile passes its `REVISION`
//! build argument, since the image's build has no `.git`); else `git rev-parse
//! --short=12 HEAD`; else `unknown`. Cargo reruns this when that variable changes, when
//! HEAD moves to another branch, and when the branch HEAD points to (loose or in
//! `packed-refs`) gets a new commit.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PGFEED_GIT_COMMIT");
    let commit = match std::env::var("PGFEED_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => {
            watch_git_refs();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
}

/// Asks Cargo to rerun when HEAD, the ref it points to or `packed-refs` changes. Only
/// files that exist are named: Cargo reruns every build for a missing one.
fn watch_git_refs() {
    let mut files = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.push(branch);
    }
    for file in files {
        // `--git-path` knows where a worktree keeps its HEAD and where the refs are.
        if let Some(path) = git(&["rev-parse", "--git-path", &file])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// The trimmed output of a successful `git` command (run where Cargo runs build scripts:
/// the package's directory).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}
