"""The data contract: Great Expectations suites and the row metrics they judge."""
