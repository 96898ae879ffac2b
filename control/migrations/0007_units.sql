-- Each modality is priced and metered in its own unit (control/pricing.py UNITS): tokens (llm,
-- embedding), images, audio seconds (voice: transcription, translation), input characters (speech).
-- A token price keeps its two per-million columns; any other unit has one USD price per unit. Rows
-- already there are token prices: an image, speech or voice deployment priced per token is refused
-- (model_not_priced) until `gatewayctl prices set --unit ...` gives it its unit's price.
ALTER TABLE deployment_prices
    ADD COLUMN unit         text NOT NULL DEFAULT 'token'
                            CHECK (unit IN ('token', 'image', 'audio_second', 'character')),
    ADD COLUMN usd_per_unit numeric CHECK (usd_per_unit >= 0),
    ADD CONSTRAINT deployment_prices_unit_price CHECK ((unit = 'token') = (usd_per_unit IS NULL));

-- What a request used in its modality's unit (NULL unit: tokens only), as the meter read it from the
-- access log; `unit_detail` says how (an image size, "upstream" or "wav" for audio seconds).
ALTER TABLE usage_events
    ADD COLUMN unit        text,
    ADD COLUMN quantity    double precision NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    ADD COLUMN unit_detail text;
