"""Everything that runs at a hospital site: site data, local training, the Flower ClientApp."""
