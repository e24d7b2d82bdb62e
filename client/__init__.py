"""The site: data stores, local trainer, the Flower ClientApp."""
