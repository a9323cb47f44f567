"""Ray Data batch jobs: embed (images -> feature store), later caption."""
