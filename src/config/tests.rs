use super::*;

const SPEC_CIRCUIT_BREAKER: &str = "\
circuit_breaker:
  failure_threshold: 5
  timeout_ms: 5000
  reset_timeout_ms: 30000
";

const SPEC_RETRY: &str = "\
retry:
  max_attempts: 3
  backoff_ms: 100
  backoff_multiplier: 2
  max_backoff_ms: 1000
";

/// Both spec blocks, as one file would hold them.
fn spec_yaml() -> String {
    format!("{SPEC_CIRCUIT_BREAKER}\n{SPEC_RETRY}")
}

#[track_caller]
fn assert_config_error(result: Result<impl std::fmt::Debug, Error>, needles: &[&str]) {
    let error = result.expect_err("configuration should be refused");
    assert_eq!(error.kind(), ErrorKind::Config, "{error:?}");
    for needle in needles {
        assert!(
            error.message().contains(needle),
            "message {:?} should contain {needle:?}",
            error.message()
        );
    }
}

fn retry(yaml_body: &str) -> Result<ResilienceConfig, Error> {
    ResilienceConfig::from_yaml(&format!("retry:\n{yaml_body}"))
}

fn circuit_breaker(yaml_body: &str) -> Result<ResilienceConfig, Error> {
    ResilienceConfig::from_yaml(&format!("circuit_breaker:\n{yaml_body}"))
}

#[test]
fn spec_yaml_gives_the_spec_values_which_are_the_defaults() {
    let config = ResilienceConfig::from_yaml(&spec_yaml()).unwrap();
    assert_eq!(
        config,
        ResilienceConfig {
            circuit_breaker: CircuitBreakerConfig {
                failure_threshold: 5,
                timeout_ms: 5000,
                reset_timeout_ms: 30000,
            },
            retry: RetryConfig {
                max_attempts: 3,
                backoff_ms: 100,
                backoff_multiplier: 2.0,
                max_backoff_ms: 1000,
                jitter: true,
                budget_percent: 20.0,
                budget_min_per_second: 10,
                budget_window_ms: 10_000,
            },
        }
    );
    assert_eq!(config, ResilienceConfig::default());
    assert_eq!(config.circuit_breaker.timeout(), Duration::from_secs(5));
    assert_eq!(
        config.circuit_breaker.reset_timeout(),
        Duration::from_secs(30)
    );
    assert_eq!(config.retry.backoff(), Duration::from_millis(100));
    assert_eq!(config.retry.max_backoff(), Duration::from_secs(1));
}

#[test]
fn spec_blocks_parse_on_their_own() {
    assert_eq!(
        CircuitBreakerConfig::from_yaml(SPEC_CIRCUIT_BREAKER).unwrap(),
        CircuitBreakerConfig::default()
    );
    assert_eq!(
        RetryConfig::from_yaml(SPEC_RETRY).unwrap(),
        RetryConfig::default()
    );
    assert_eq!(
        ResilienceConfig::from_yaml(SPEC_RETRY).unwrap(),
        ResilienceConfig::default()
    );
}

#[test]
fn a_single_block_parser_refuses_the_other_block() {
    assert_config_error(RetryConfig::from_yaml(&spec_yaml()), &["circuit_breaker"]);
    assert_config_error(
        CircuitBreakerConfig::from_yaml(SPEC_RETRY),
        &["retry", "line 1"],
    );
}

#[test]
fn a_single_block_parser_validates() {
    assert_config_error(
        RetryConfig::from_yaml("retry:\n  max_attempts: 0\n"),
        &["retry.max_attempts"],
    );
    assert_config_error(
        CircuitBreakerConfig::from_yaml("circuit_breaker:\n  timeout_ms: 0\n"),
        &["circuit_breaker.timeout_ms"],
    );
}

#[test]
fn one_key_can_be_overridden() {
    let config = ResilienceConfig::from_yaml("retry:\n  max_attempts: 5\n").unwrap();
    assert_eq!(
        config,
        ResilienceConfig {
            retry: RetryConfig {
                max_attempts: 5,
                ..RetryConfig::default()
            },
            ..ResilienceConfig::default()
        }
    );
}

#[test]
fn an_empty_document_gives_the_defaults() {
    for text in ["", "# nothing to change\n", "retry:\n"] {
        assert_eq!(
            ResilienceConfig::from_yaml(text).unwrap(),
            ResilienceConfig::default(),
            "{text:?}"
        );
    }
    assert_eq!(RetryConfig::from_yaml("").unwrap(), RetryConfig::default());
    assert_eq!(
        CircuitBreakerConfig::from_yaml("").unwrap(),
        CircuitBreakerConfig::default()
    );
}

#[test]
fn default_round_trips_through_yaml() {
    let yaml = serde_norway::to_string(&ResilienceConfig::default()).unwrap();
    assert_eq!(
        ResilienceConfig::from_yaml(&yaml).unwrap(),
        ResilienceConfig::default()
    );
}

#[test]
fn unknown_key_inside_a_block_is_refused_with_its_name_and_line() {
    assert_config_error(
        retry("  max_attempts: 5\n  max_retries: 2\n"),
        &["retry", "max_retries", "line 3"],
    );
    assert_config_error(
        circuit_breaker("  treshold: 2\n"),
        &["circuit_breaker", "treshold", "line 2"],
    );
}

#[test]
fn unknown_top_level_key_is_refused_with_its_name_and_line() {
    assert_config_error(
        ResilienceConfig::from_yaml("retries:\n  max_attempts: 5\n"),
        &["retries", "line 1"],
    );
    assert_config_error(
        ResilienceConfig::from_yaml(&format!("{}bulkhead:\n  limit: 3\n", spec_yaml())),
        &["bulkhead", "line 11"],
    );
}

#[test]
fn zero_failure_threshold_is_refused() {
    assert_config_error(
        circuit_breaker("  failure_threshold: 0\n"),
        &["circuit_breaker.failure_threshold"],
    );
}

#[test]
fn zero_timeout_is_refused() {
    assert_config_error(
        circuit_breaker("  timeout_ms: 0\n"),
        &["circuit_breaker.timeout_ms"],
    );
}

#[test]
fn zero_reset_timeout_is_refused() {
    assert_config_error(
        circuit_breaker("  reset_timeout_ms: 0\n"),
        &["circuit_breaker.reset_timeout_ms"],
    );
}

#[test]
fn zero_max_attempts_is_refused() {
    assert_config_error(retry("  max_attempts: 0\n"), &["retry.max_attempts"]);
}

#[test]
fn backoff_multiplier_below_one_is_refused() {
    assert_config_error(
        retry("  backoff_multiplier: 0.5\n"),
        &["retry.backoff_multiplier", "0.5"],
    );
}

#[test]
fn backoff_multiplier_of_one_is_accepted() {
    let config = retry("  backoff_multiplier: 1\n").unwrap();
    assert_eq!(config.retry.backoff_multiplier, 1.0);
}

#[test]
fn non_finite_backoff_multiplier_is_refused() {
    for value in [".nan", ".inf", "-.inf"] {
        assert_config_error(
            retry(&format!("  backoff_multiplier: {value}\n")),
            &["retry.backoff_multiplier"],
        );
    }
}

#[test]
fn zero_backoff_is_refused() {
    assert_config_error(retry("  backoff_ms: 0\n"), &["retry.backoff_ms"]);
}

#[test]
fn zero_max_backoff_is_refused() {
    assert_config_error(retry("  max_backoff_ms: 0\n"), &["retry.max_backoff_ms"]);
}

#[test]
fn first_backoff_above_its_cap_is_refused() {
    assert_config_error(
        retry("  backoff_ms: 2000\n  max_backoff_ms: 1000\n"),
        &["retry.backoff_ms", "retry.max_backoff_ms"],
    );
    let equal = retry("  backoff_ms: 1000\n  max_backoff_ms: 1000\n").unwrap();
    assert_eq!(equal.retry.backoff(), equal.retry.max_backoff());
}

#[test]
fn a_retry_budget_outside_what_it_can_count_is_refused() {
    for (body, key) in [
        ("  budget_percent: -1\n", "retry.budget_percent"),
        ("  budget_percent: 1001\n", "retry.budget_percent"),
        ("  budget_window_ms: 999\n", "retry.budget_window_ms"),
        ("  budget_window_ms: 60001\n", "retry.budget_window_ms"),
        (
            "  budget_min_per_second: 2147483647\n",
            "retry.budget_min_per_second",
        ),
    ] {
        assert_config_error(retry(body), &[key]);
    }
    let config = retry("  jitter: false\n  budget_percent: 0\n  budget_window_ms: 1000\n").unwrap();
    assert!(!config.retry.jitter);
    assert_eq!(config.retry.budget_window(), Duration::from_secs(1));
}

#[test]
fn text_that_is_not_yaml_is_refused() {
    assert_config_error(
        ResilienceConfig::from_yaml("retry:\n\tmax_attempts: 1\n"),
        &["line 2"],
    );
    assert_config_error(ResilienceConfig::from_yaml("retry: [\n"), &["retry"]);
}

#[test]
fn a_value_of_the_wrong_type_is_refused() {
    assert_config_error(
        retry("  max_attempts: three\n"),
        &["retry.max_attempts", "three", "line 2"],
    );
    assert_config_error(
        circuit_breaker("  timeout_ms: -1\n"),
        &["circuit_breaker.timeout_ms", "line 2"],
    );
    assert_config_error(
        ResilienceConfig::from_yaml("retry: 3\n"),
        &["retry", "line 1"],
    );
    assert_config_error(ResilienceConfig::from_yaml("- retry\n"), &["line 1"]);
}

#[test]
fn validate_checks_values_built_in_code() {
    let mut config = ResilienceConfig::default();
    assert!(config.validate().is_ok());
    config.retry.max_attempts = 0;
    assert_config_error(config.validate(), &["retry.max_attempts"]);
}
