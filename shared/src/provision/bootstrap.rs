//! The machine bootstrap: a versioned, idempotent script run through the
//! executions API. A marker under the home directory names the version that
//! succeeded; a tool check re-runs the script when the root filesystem lost
//! its packages (docs/design.md §2: only home is sure to persist).

use crate::config::DEFAULT_BOOTSTRAP;
use crate::dedalus::{self, ExecutionRequest};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// The tool check that goes with [`DEFAULT_BOOTSTRAP`].
pub const DEFAULT_CHECK: &str =
    "command -v curl && command -v git && command -v pip3 && command -v node";

/// Runs `$2` (script) unless the marker for version `$1` exists and `$3`
/// (check) passes; writes the marker on success.
const WRAPPER: &str = r#"marker="$HOME/.agenthome/bootstrap-$1.done"
if [ -f "$marker" ] && bash -c "$3" >/dev/null 2>&1; then echo "agenthome-bootstrap: already done"; exit 0; fi
echo "agenthome-bootstrap: running version $1"
bash -ec "$2" || exit $?
mkdir -p "$HOME/.agenthome" && printf '%s\n' "$1" > "$marker"
"#;

/// How much of the output a failure reports.
const TAIL_BYTES: usize = 2000;

/// A bootstrap script, its tool check and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    script: String,
    check: String,
    version: String,
}

/// What [`Bootstrap::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapOutcome {
    /// The marker and the tools were there: nothing ran.
    AlreadyDone,
    /// The script ran and succeeded.
    Ran,
    /// The script failed.
    Failed {
        /// Exit code, if it exited.
        exit_code: Option<i64>,
        /// The end of its output (stdout then stderr).
        tail: String,
    },
}

impl Bootstrap {
    /// A bootstrap of `script`; `check` is a shell command that succeeds when
    /// the tools the script installs are present (default: the
    /// [`DEFAULT_CHECK`] for the default script, `true` otherwise). The
    /// version is derived from both, so changing either re-runs it.
    pub fn new(script: impl Into<String>, check: Option<String>) -> Self {
        let script = script.into();
        let check = check.unwrap_or_else(|| {
            if script == DEFAULT_BOOTSTRAP {
                DEFAULT_CHECK.to_string()
            } else {
                "true".to_string()
            }
        });
        let digest = Sha256::new()
            .chain_update(script.as_bytes())
            .chain_update([0u8])
            .chain_update(check.as_bytes())
            .finalize();
        let version = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Bootstrap {
            script,
            check,
            version,
        }
    }

    /// The version recorded in the item (`bootstrap_version`) and the marker.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The marker file, relative to the machine's home.
    pub fn marker(&self) -> String {
        format!(".agenthome/bootstrap-{}.done", self.version)
    }

    /// The execution that checks and, if needed, runs the bootstrap.
    pub fn request(&self, timeout_ms: u64) -> ExecutionRequest {
        ExecutionRequest::new([
            "bash",
            "-c",
            WRAPPER,
            "agenthome-bootstrap",
            self.version.as_str(),
            self.script.as_str(),
            self.check.as_str(),
        ])
        .timeout_ms(timeout_ms)
    }

    /// Check the marker and tools; run the script if either is missing.
    pub async fn ensure(
        &self,
        client: &dedalus::Client,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<BootstrapOutcome, dedalus::Error> {
        let timeout_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let run = client
            .run_and_wait(machine_id, &self.request(timeout_ms.max(1000)), deadline)
            .await?;
        if run.success() {
            if run
                .output
                .stdout
                .starts_with("agenthome-bootstrap: already done")
            {
                Ok(BootstrapOutcome::AlreadyDone)
            } else {
                Ok(BootstrapOutcome::Ran)
            }
        } else {
            let mut all = run.output.stdout.clone();
            all.push_str(&run.output.stderr);
            Ok(BootstrapOutcome::Failed {
                exit_code: run.exit_code(),
                tail: tail(&all, TAIL_BYTES),
            })
        }
    }
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.trim_end().to_string();
    }
    let start = crate::text::ceil_boundary(s, s.len() - max);
    format!("…{}", s[start..].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_changes_with_script_or_check() {
        let a = Bootstrap::new("echo a", None);
        assert_eq!(a.version().len(), 12);
        assert_eq!(a.version(), Bootstrap::new("echo a", None).version());
        assert_ne!(a.version(), Bootstrap::new("echo b", None).version());
        assert_ne!(
            a.version(),
            Bootstrap::new("echo a", Some("command -v x".into())).version()
        );
    }

    #[test]
    fn default_script_gets_the_tool_check() {
        assert_eq!(Bootstrap::new(DEFAULT_BOOTSTRAP, None).check, DEFAULT_CHECK);
        assert_eq!(Bootstrap::new("true", None).check, "true");
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("short\n", 10), "short");
        let t = tail("ééééé", 3);
        assert!(t.ends_with('é') && t.starts_with('…'), "{t}");
    }
}
