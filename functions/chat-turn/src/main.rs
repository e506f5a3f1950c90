//! `chat-turn` Lambda function. Not implemented yet: it refuses to start rather
//! than pretend to work.

fn main() -> std::process::ExitCode {
    eprintln!("chat-turn: not yet implemented (see the open issues); refusing to start");
    std::process::ExitCode::FAILURE
}
