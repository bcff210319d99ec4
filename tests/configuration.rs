//! The documentation of the settings cannot drift from the code: the README's
//! configuration table and `.env.example` list exactly the environment variables of
//! `rls-relay serve`, with the defaults clap applies; the README's demo table does the
//! same for `rls-relay demo`.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use rls_relay::config::Cli;

const README: &str = include_str!("../README.md");
const ENV_EXAMPLE: &str = include_str!("../.env.example");

/// Environment variable → default (None when there is none, or it is empty) of a
/// subcommand, as clap defines them.
fn settings_of(subcommand: &str) -> BTreeMap<String, Option<String>> {
    let cli = Cli::command();
    let command = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            Some((env, Some(default).filter(|d| !d.is_empty())))
        })
        .collect()
}

/// The rows of the first table after `heading`: variable → default column.
fn readme_table(heading: &str) -> BTreeMap<String, String> {
    let start = README
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let section = &README[start + heading.len()..];
    let end = section.find("\n#").unwrap_or(section.len());
    section[..end]
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_owned();
            (name, cells[2].to_owned())
        })
        .collect()
}

/// The README shows a default as `value`; anything else (blank, "(required)", "same
/// origin", "inferred") says there is no literal default.
fn documented_default(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

fn compare(
    what: &str,
    code: &BTreeMap<String, Option<String>>,
    documented: &BTreeMap<String, String>,
) {
    let code_names: BTreeSet<_> = code.keys().collect();
    let documented_names: BTreeSet<_> = documented.keys().collect();
    assert_eq!(
        code_names.difference(&documented_names).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "settings missing from the {what}"
    );
    assert_eq!(
        documented_names.difference(&code_names).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "the {what} documents settings the code does not have"
    );
    for (name, default) in code {
        let cell = &documented[name];
        match default {
            Some(default) => assert_eq!(
                documented_default(cell),
                Some(default.as_str()),
                "{what}: default of {name}"
            ),
            None => assert_eq!(
                documented_default(cell),
                None,
                "{what}: {name} has no default in the code, but {cell} is documented"
            ),
        }
    }
}

#[test]
fn the_readme_configuration_table_matches_serve() {
    compare(
        "README configuration table",
        &settings_of("serve"),
        &readme_table("## Configuration"),
    );
}

#[test]
fn check_reads_the_same_settings_as_serve() {
    assert_eq!(settings_of("check"), settings_of("serve"));
}

#[test]
fn the_readme_demo_table_matches_demo() {
    compare(
        "README demo table",
        &settings_of("demo"),
        &readme_table("### Demo settings"),
    );
}

#[test]
fn env_example_lists_every_setting_of_serve_with_its_default() {
    let serve = settings_of("serve");
    let demo = settings_of("demo");
    let mut listed = BTreeMap::new();
    for line in ENV_EXAMPLE.lines() {
        let (active, rest) = match line.strip_prefix('#') {
            Some(rest) => (false, rest.trim_start()),
            None => (true, line),
        };
        let Some((name, value)) = rest.split_once('=') else {
            continue;
        };
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_name {
            listed.insert(name.to_owned(), (active, value.to_owned()));
        }
    }
    for name in serve.keys() {
        assert!(listed.contains_key(name), ".env.example lacks {name}");
    }
    for (name, (active, value)) in &listed {
        let default = match (serve.get(name), demo.get(name)) {
            (Some(default), _) | (None, Some(default)) => default,
            (None, None) => panic!(".env.example lists {name}, which no command reads"),
        };
        if let (true, Some(default), Some(_)) = (active, default, serve.get(name)) {
            assert_eq!(
                value, default,
                ".env.example: {name} differs from the default"
            );
        }
    }
}

#[test]
fn serve_help_names_every_environment_variable() {
    let mut cli = Cli::command();
    let help = cli
        .find_subcommand_mut("serve")
        .expect("serve")
        .render_long_help()
        .to_string();
    for name in settings_of("serve").keys() {
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} not in --help"
        );
    }
}

#[test]
fn the_readme_metrics_table_lists_exactly_the_exported_metrics() {
    let text = rls_relay::metrics::Metrics::new().render();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let start = README.find("### Metrics").expect("README has ### Metrics");
    let section = &README[start..];
    let section = &section[..section[3..]
        .find("\n#")
        .map_or(section.len(), |end| end + 3)];
    let documented: BTreeSet<String> = section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| {
            // `relay_a`, `relay_b{label}` in the first cell.
            let cell = line.split('|').nth(1).unwrap_or("");
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|name| name.split('{').next().unwrap_or(name).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(documented, exported);
}
