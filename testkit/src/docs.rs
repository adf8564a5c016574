//! The README as the tests that hold it true read it: its text and its shell blocks.

/// The README's text.
pub fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The lines of the first ```` ```sh ```` block in `text`.
pub fn first_sh_block(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(str::to_string)
        .collect()
}
