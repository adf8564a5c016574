//! The `pgfeed` binary: parse flags, run the command (which starts logging once the
//! configuration is known), report errors.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = pgfeed::cli::Cli::parse();
    match pgfeed::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = format!("error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(&format!("\n  caused by: {text}"));
                }
                source = cause.source();
            }
            // Not eprintln!, which panics on a broken stderr.
            pgfeed::logging::eprint(&message);
            ExitCode::FAILURE
        }
    }
}
