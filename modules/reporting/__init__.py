"""Stage 5, reporting: charts (PNG + CSV), the evaluation report and the chart gallery."""
