//! The bash text the runners send: shell setup, the per-command line of the
//! terminal backend and the wrapper of the executions backend.
//!
//! Everything the shell writes lives under `~/.agenthome/`:
//! - `run/<id>.done` — the command's exit code, written when it finishes
//!   (the completion marker the sweep and the next turn look for);
//! - `run/<id>.log` — its combined stdout+stderr (kept so the output of a
//!   command left running can be read later; logs over 1 MiB are cut to
//!   their last MiB when the command ends; files older than 7 days are
//!   pruned when a shell is set up);
//! - `run/term-<terminal id>.busy` — non-empty while a terminal's shell runs
//!   a command (so a later turn does not type into a busy shell); it holds
//!   the command id, never the nonce of its markers, and is emptied (not
//!   removed: no process) when the command ends;
//! - `run/<id>.cmd` — a long command, delivered before its (short) line is
//!   typed, removed as the line reads it;
//! - `shell/cwd`, `shell/env` — the working directory and exported
//!   variables after the last command (`export -p`), restored by new shells;
//!   `shell/by` names the shell that saved them (a terminal id, or `exec`).

use base64::Engine as _;

/// Directory (relative to home) of completion markers and logs.
pub const RUN_DIR: &str = ".agenthome/run";

/// The completion marker of command `id`, relative to home.
pub fn completion_marker(id: &str) -> String {
    format!("{RUN_DIR}/{id}.done")
}

/// The log of command `id`, relative to home.
pub fn log_path(id: &str) -> String {
    format!("{RUN_DIR}/{id}.log")
}

/// The file a long command is delivered in before its line is typed,
/// relative to home (removed as the line reads it).
pub fn command_file(id: &str) -> String {
    format!("{RUN_DIR}/{id}.cmd")
}

/// A fresh command id (32 hex digits, time-ordered).
pub fn new_command_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A fresh secret for one command's markers (32 random hex digits). It is
/// never written to a file on the machine: the shell prints it only in the
/// markers, the end marker once the command has ended, so no process on the
/// machine can learn it before then (the command id, in the busy file and
/// the marker paths, is not enough to forge an end marker).
pub fn new_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Typed lines longer than this are not typed whole: the command goes to a
/// file first ([`write_command_script`]) and a short line runs it
/// ([`terminal_line_from_file`]). Bash reads a line typed while it is still
/// busy in canonical mode, where the kernel keeps at most 4095 bytes of an
/// unfinished line; this stays well below.
pub const MAX_TYPED_LINE: usize = 2048;

/// `s` as a single-quoted shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn b64(command: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(command.as_bytes())
}

/// Environment defaults that suit a non-interactive agent: no pagers, no
/// colours, unbuffered Python, no apt prompts.
const DEFAULTS: &str = "export PAGER=cat GIT_PAGER=cat SYSTEMD_PAGER= MANPAGER=cat \
NO_COLOR=1 TERM=dumb PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive \
HISTFILE=\"$HOME/.bash_history\"";

/// Restores the saved working directory and exported variables.
const RESTORE: &str = "__ah_s=\"${__AH_HOME:-$HOME}/.agenthome/shell\"; \
cd \"${__AH_HOME:-$HOME}\" 2>/dev/null; \
if [ -r \"$__ah_s/cwd\" ]; then cd -- \"$(cat \"$__ah_s/cwd\")\" 2>/dev/null; fi; \
if [ -r \"$__ah_s/env\" ]; then . \"$__ah_s/env\" 2>/dev/null; fi; unset __ah_s";

/// Saves the working directory and exported variables (atomically) in
/// `dir` (a shell word: `~/.agenthome/shell`), and which shell saved them
/// last (`who`, a shell word, in `by`).
/// Variables that describe the process rather than the user's context are
/// left out.
fn save(dir: &str, who: &str) -> String {
    format!(
        "{{ mkdir -p {dir} && pwd >| {dir}/cwd.tmp && mv -f {dir}/cwd.tmp {dir}/cwd; \
export -p | grep -Ev '^declare -x (PWD|OLDPWD|SHLVL|_|DCS_EMULATOR_MACHINE_ID)(=|$)' \
>| {dir}/env.tmp && mv -f {dir}/env.tmp {dir}/env; printf '%s\\n' {who} >| {dir}/by; }} 2>/dev/null"
    )
}

/// [`save`] by a terminal's shell, skipped when nothing it would write has
/// changed: this shell (`who`, a shell word) saved last, and its working
/// directory and exported variables are those it saved then (kept in the
/// shell's own unexported `__ah_pwd`/`__ah_env`). The check costs one fork
/// (`$(export -p)`) and builtins; the save it skips, four processes, each
/// of which the next line typed into this shell would wait for. For
/// [`line`] (its `__ah_h`).
fn save_if_changed(who: &str) -> String {
    format!(
        "{{ __ah_e=\"$(export -p)\" __ah_w= __ah_s=\"$__ah_h/shell\"; \\builtin read -r __ah_w < \"$__ah_s/by\"; \
if [[ \"$__ah_w\" != {who} || \"$PWD\" != \"${{__ah_pwd-}}\" || \"$__ah_e\" != \"${{__ah_env-}}\" ]]; then \
{save}; __ah_pwd=$PWD; __ah_env=$__ah_e; fi; unset __ah_e __ah_w __ah_s; }} 2>/dev/null",
        save = save("\"$__ah_s\"", who),
    )
}

/// Remembers the shell's home as it was when agenthome first set the shell
/// up (read-only: the agent cannot change it in that shell), so agenthome's
/// own lines find `~/.agenthome` even after the agent changed `HOME`.
const KEEP_HOME: &str = "[ -n \"${__AH_HOME:-}\" ] || readonly __AH_HOME=\"$HOME\" 2>/dev/null";

/// The home agenthome's shell lines use for their own files: the one set
/// aside at setup ([`KEEP_HOME`]), or `HOME` where there is none (an
/// execution, a shell set up before it existed).
const AH_HOME: &str = "${__AH_HOME:-$HOME}";

/// Cuts a log over 1 MiB to its last MiB.
fn trim_log(log: &str) -> String {
    format!(
        "if [ \"$(wc -c < {log} 2>/dev/null || echo 0)\" -gt 1048576 ]; then \
tail -c 1048576 {log} > {log}.tmp 2>/dev/null && mv -f {log}.tmp {log}; fi 2>/dev/null"
    )
}

/// The one-time setup of a terminal's shell, ending with the start and end
/// markers of `id` (so the runner knows when the setup is done). On a new
/// shell the setup line is recorded in the history before it can set
/// `HISTCONTROL`, so it deletes itself — only if the last entry is itself
/// (a reused shell has not recorded it, and its last entry is the agent's)
/// — and `~/.bash_history` holds only the agent's commands.
/// `restore`: restore the saved cwd and environment (a new terminal).
pub fn terminal_setup(id: &str, restore: bool) -> String {
    let restore = if restore { RESTORE } else { ":" };
    format!(
        " __ah_setup=1; stty -echo -onlcr 2>/dev/null; PS1=''; PS2=''; PROMPT_COMMAND=''; \
HISTCONTROL=ignorespace; \
case \"$(HISTTIMEFORMAT= history 1)\" in *__ah_setup*) history -d -1 ;; esac; shopt -s histappend; \
bind 'set enable-bracketed-paste off' 2>/dev/null; set +o emacs +o vi; {KEEP_HOME}; {restore}; {DEFAULTS}; \
mkdir -p \"{AH_HOME}/{RUN_DIR}\"; \
find \"{AH_HOME}/{RUN_DIR}\" -type f -mtime +7 -delete 2>/dev/null; \
printf '\\n%s_%s\\n' __AH_START {id}; printf '\\n%s_%s:%d\\n' __AH_END {id} 0\n"
    )
}

/// The line that runs `command` in a terminal's persistent shell.
///
/// It starts with a space (`HISTCONTROL=ignorespace` keeps it out of the
/// history), sets the command as one ANSI-C quoted word ([`ansi_c_quote`]:
/// no quoting issues, no process; base64 where that is shorter or the
/// command has a NUL), marks the
/// terminal busy (the busy file holds the command id), prints the start
/// marker (straight to the terminal, so it is seen even if the command makes
/// the shell exit), then runs it with `eval` inside a brace group — in the
/// shell itself, so `cd` and `export` persist — with stdin from /dev/null
/// and stdout+stderr through `tee` into the command's log. The group ends
/// by writing the completion marker and printing the end marker *through
/// the same pipe*, so the marker can never overtake the command's output.
/// Both markers carry `nonce` (see [`new_nonce`]), not the id. Then the
/// command (not this line) is added to the history and appended to
/// `~/.bash_history`, and cwd/env are saved for new shells when they
/// changed ([`save_if_changed`]). What follows the end marker runs before
/// the shell reads its next line, so it starts only one process in the
/// usual case (`stty`); it is one group whose status is caught, so an
/// agent's `set -e` cannot end the shell there. The log is cut by the
/// `tee` stage once it has written everything, apart from the shell.
pub fn terminal_line(id: &str, nonce: &str, terminal_id: &str, command: &str) -> String {
    let quoted = line(
        id,
        nonce,
        terminal_id,
        &format!("__ah_c={}", ansi_c_quote(command)),
    );
    if !command.contains('\0') && quoted.len() <= MAX_TYPED_LINE {
        return quoted;
    }
    // A NUL (bash drops it from a decoded word but would end a quoted one
    // there), or a command whose quoted form is too long to type, which
    // base64 (a third longer than the command, where quoting non-ASCII
    // text makes it four times as long) may still fit.
    let load = format!(
        "__ah_c=\"$(printf %s {} | base64 -d)\"",
        shell_quote(&b64(command))
    );
    line(id, nonce, terminal_id, &load)
}

/// [`terminal_line`] for a command delivered in [`command_file`] (by
/// [`write_command_script`]): the line stays short whatever the command's
/// size, and removes the file once read.
pub fn terminal_line_from_file(id: &str, nonce: &str, terminal_id: &str) -> String {
    // `__ah_p` is still the bare id here (see `line`).
    let load = "__ah_c=\"$(cat \"$__ah_h/run/$__ah_p.cmd\"; rm -f \"$__ah_h/run/$__ah_p.cmd\")\"";
    line(id, nonce, terminal_id, load)
}

/// The `bash -c` script (for an execution, the command on its stdin) that
/// writes command `id` to [`command_file`] atomically.
pub fn write_command_script(id: &str) -> String {
    let file = format!("\"$HOME/{}\"", command_file(id));
    format!("mkdir -p \"$HOME/{RUN_DIR}\" && cat > {file}.tmp && mv -f {file}.tmp {file}")
}

/// The line of [`terminal_line`] around `load` (which sets `__ah_c`). Its
/// own variables, unset at its end: `__ah_h` agenthome's directory,
/// `__ah_p` the command's files without their suffix, `__ah_b` the busy
/// file, `__ah_t` the terminal.
fn line(id: &str, nonce: &str, terminal_id: &str, load: &str) -> String {
    let trim = trim_log("\"$l\"");
    let save = save_if_changed("\"$__ah_t\"");
    format!(
        " __ah_h=\"{AH_HOME}/.agenthome\" __ah_p={id} __ah_t={terminal}; {load}; [[ -d $__ah_h/run ]] || \
mkdir -p \"$__ah_h/run\"; __ah_b=\"$__ah_h/run/term-$__ah_t.busy\" __ah_p=\"$__ah_h/run/$__ah_p\"; printf %s {id} >| \"$__ah_b\"; \
printf '\\n%s_%s\\n' __AH_START {nonce}; {{ eval \"$__ah_c\" < /dev/null; __ah=$?; \
printf '%d\\n' \"$__ah\" >| \"$__ah_p.done\"; printf '\\n%s_%s:%d\\n' __AH_END {nonce} \"$__ah\"; }} \
> >(l=\"$__ah_p.log\"; tee -a \"$l\"; {trim}) 2>&1; {{ >| \"$__ah_b\"; history -s -- \"$__ah_c\"; history -a; \
{save}; stty -echo -onlcr; }} 2>/dev/null || __ah=$?; unset __ah_c __ah_h __ah_p __ah_b __ah_t\n",
        terminal = shell_quote(terminal_id),
    )
}

/// The `bash -c` script of the executions backend: restores cwd and
/// exported variables, appends the command to `~/.bash_history`, runs it
/// (stdout and stderr merged in order, also tee'd to the command's log),
/// and on exit — including an `exit` inside the command — saves cwd and
/// env, waits (at most 2 s: a background job may hold the pipe) for `tee`
/// to finish the log, and writes the completion marker.
pub fn execution_wrapper(id: &str, command: &str) -> String {
    let log = format!("\"$HOME/{}\"", log_path(id));
    let trim = trim_log(&log);
    format!(
        "{DEFAULTS}; mkdir -p \"$HOME/{RUN_DIR}\"; {RESTORE}; \
__ah_c=\"$(printf %s {b} | base64 -d)\"; \
printf '%s\\n' \"$__ah_c\" >> \"$HOME/.bash_history\"; \
__ah_exit() {{ __ah=$?; {save}; exec >&- 2>&-; for __ah_i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
kill -0 \"$__ah_tee\" 2>/dev/null || break; sleep 0.1; done; \
printf '%d\\n' \"$__ah\" > \"$HOME/{RUN_DIR}/{id}.done\"; {trim}; exit \"$__ah\"; }}; \
exec > >(tee -a {log}) 2>&1; __ah_tee=$!; trap __ah_exit EXIT; \
eval \"$__ah_c\" < /dev/null\n",
        b = shell_quote(&b64(command)),
        save = save("\"$HOME/.agenthome/shell\"", "exec"),
    )
}

/// A script printing the exit code in completion marker `marker` (relative
/// to home), or nothing when it does not exist.
pub fn read_marker_script(marker: &str) -> String {
    format!(
        "cat -- \"$HOME\"/{} 2>/dev/null || true",
        shell_quote(marker)
    )
}

/// A script printing `<id> busy` or `<id> idle` for each terminal of
/// `terminal_ids`, one per line (busy: its shell runs a command).
pub fn busy_list_script(terminal_ids: &[String]) -> String {
    let ids: Vec<String> = terminal_ids.iter().map(|t| shell_quote(t)).collect();
    format!(
        "for t in {}; do if [ -s \"$HOME/{RUN_DIR}/term-$t.busy\" ]; then echo \"$t busy\"; \
else echo \"$t idle\"; fi; done",
        ids.join(" ")
    )
}

/// A line agenthome types into a terminal's shell for its own work (not
/// the agent's: nothing of it enters the history, cwd or environment):
/// `script` (agenthome's own text, one line) runs in a fresh
/// `bash --noprofile --norc` under `env -i`, so the agent's aliases,
/// functions, shell options (`set -e`…) and variables (`BASH_ENV`, a
/// changed `HOME`: the home set aside at setup is used) do not reach it,
/// and `|| :` keeps a shell with `set -e` alive whatever it returns. Its
/// output comes between the markers of `nonce`.
pub fn internal_line(nonce: &str, script: &str) -> String {
    let script = script.replace('\n', " ");
    let inner = format!(
        "printf '\\n%s_%s\\n' __AH_START {nonce}; {{ {script}; }} 2>&1; \
printf '\\n%s_%s:%d\\n' __AH_END {nonce} \"$?\""
    );
    format!(
        " /usr/bin/env -i HOME=\"${{__AH_HOME:-$HOME}}\" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
/bin/bash --noprofile --norc -c {} < /dev/null 2>&1 || :\n",
        shell_quote(&inner)
    )
}

/// A line agenthome types into a terminal's shell for its own short work
/// where starting a process would cost more than the work: `body` runs in
/// the agent's shell itself, so it must use only shell syntax and builtins
/// called as `\builtin NAME` (an alias or a function of the agent's named
/// like the builtin cannot stand in for it; a function named `builtin`
/// could, which no agent has a reason to define). The markers and `body`
/// form one group whose status is caught (`|| …`): `set -e` is ignored
/// inside it and cannot end the shell, and its stderr is discarded. The end
/// marker of `nonce` carries `body`'s exit status; nothing of the line
/// enters the history (leading space). `vars`: the variables `body` sets,
/// unset at the end of the line.
pub fn builtin_line(nonce: &str, body: &str, vars: &[&str]) -> String {
    let body = body.replace('\n', " ");
    let vars = vars.join(" ");
    format!(
        " __ah_r=0; {{ \\builtin printf '\\n%s_%s\\n' __AH_START {nonce}; {{ {body}; }}; }} 2>/dev/null || __ah_r=$?; \\builtin printf '\\n%s_%s:%d\\n' __AH_END {nonce} \"$__ah_r\" || __ah_r=; \\builtin unset -v __ah_r {vars}\n"
    )
}

/// `text` as a bash ANSI-C quoted word (`$'…'`) of printable ASCII only:
/// quotes, backslashes, control characters and every non-ASCII byte are
/// escaped, so it can be typed into a terminal as it is and a builtin
/// (`printf`) writes it without any other process. `!` is escaped too, so
/// an interactive shell's history expansion never sees one.
pub fn ansi_c_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("$'");
    for b in text.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            b'!' => out.push_str("\\x21"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            ansi_c_quote("it's !!\\\né"),
            r"$'it\'s \x21\x21\\\x0a\xc3\xa9'"
        );
    }

    #[test]
    fn markers_carry_the_nonce_and_never_the_id() {
        let (id, nonce) = (new_command_id(), new_nonce());
        for line in [
            terminal_line(&id, &nonce, "tm-1", "echo hi"),
            terminal_line_from_file(&id, &nonce, "tm-1"),
        ] {
            assert!(line.contains(&format!("__AH_START {nonce}")), "{line}");
            assert!(line.contains(&format!("__AH_END {nonce}")), "{line}");
            assert!(!line.contains(&format!("__AH_END {id}")), "{line}");
            assert!(
                line.contains(&format!("printf %s {id} >")),
                "busy file: {line}"
            );
            assert!(!line.contains(&format!("{nonce} >")), "{line}");
        }
        assert!(!write_command_script(&id).contains(&nonce));
    }

    #[test]
    fn a_long_command_line_stays_short_when_delivered_in_a_file() {
        let big = "x".repeat(64 * 1024);
        let id = new_command_id();
        assert!(terminal_line(&id, "n", "tm", &big).len() > MAX_TYPED_LINE);
        let line = terminal_line_from_file(&id, "n", "tm");
        assert!(line.len() < MAX_TYPED_LINE, "{}", line.len());
        assert!(
            line.contains(&format!("__ah_p={id} ")) && line.contains("$__ah_p.cmd"),
            "{line}"
        );
    }

    #[test]
    fn lines_never_contain_their_own_markers() {
        let id = new_command_id();
        for line in [
            terminal_line(&id, &id, "tm-1", "echo hi"),
            terminal_line_from_file(&id, &id, "tm-1"),
            terminal_setup(&id, true),
            execution_wrapper(&id, "echo hi"),
            internal_line(&id, "echo 'hi'; ls"),
        ] {
            assert!(!line.contains(&format!("__AH_START_{id}")));
            assert!(!line.contains(&format!("__AH_END_{id}")));
            assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
            assert!(line.ends_with('\n'));
        }
    }

    #[test]
    fn the_command_travels_encoded_never_as_typed() {
        let line = terminal_line("id", "n", "tm", "echo 'x' \"$y\"\nls");
        assert!(!line.contains("echo 'x'"));
        assert!(
            line.contains("__ah_c=$'echo \\'x\\'"),
            "ANSI-C quoted: {line}"
        );
        assert!(!line.contains("base64"), "{line}");
        assert!(
            line.starts_with(' '),
            "leading space keeps it out of history"
        );
        // A NUL, or non-ASCII text too long to type quoted: base64.
        assert!(terminal_line("id", "n", "tm", "a\0b").contains("base64 -d"));
        let wide = "é".repeat(200);
        let line = terminal_line("id", "n", "tm", &wide);
        assert!(
            line.contains("base64 -d") && line.len() <= MAX_TYPED_LINE,
            "{} {line}",
            line.len()
        );
    }

    #[test]
    fn a_typed_line_leaves_most_of_its_room_to_the_command() {
        // Ids as the runner makes them, a terminal id as the API gives it:
        // what is left of MAX_TYPED_LINE is the room for a command typed
        // whole (longer ones cost an execution to deliver).
        let (id, nonce) = (new_command_id(), new_nonce());
        let terminal = format!("tm-{}", new_nonce());
        let fixed = terminal_line(&id, &nonce, &terminal, "").len();
        assert!(fixed <= 1450, "the line around a command: {fixed} bytes");
    }

    #[test]
    fn marker_paths_are_relative_to_home() {
        assert_eq!(completion_marker("abc"), ".agenthome/run/abc.done");
        assert!(!completion_marker("abc").starts_with('/'));
    }
}
