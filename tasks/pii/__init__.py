"""Find and scrub personal data: detectors with validators, replacement policies, the scrub stage and the evaluation harness."""
