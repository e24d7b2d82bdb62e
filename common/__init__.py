"""What the site and the coordinator share: config, models, adapters, math, wire."""
