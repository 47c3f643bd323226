"""What gram-ray knows about the clusters it runs on: the pre-flight check of a job against a cluster YAML."""
