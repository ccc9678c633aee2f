"""MONARC-shaped stats, as the front office's collection job sends them (see
/work/shared/spec/monarc-front-office.md): five stats per analysis and date, threat and
vulnerability labels in MONARC's four languages (label1 fr, label2 en, label3 de, label4 nl).

Deterministic for a given seed; used by the dashboard tests and to draw the screenshots.
"""

from __future__ import annotations

import random
import uuid
from datetime import date, timedelta

# (uuid seed, fr, en, de, nl)
THREATS = [
    ("Incendie", "Fire", "Feuer", "Brand"),
    ("Dégât des eaux", "Water damage", "Wasserschaden", "Waterschade"),
    ("Sinistre majeur", "Major accident", "Großunfall", "Zware ramp"),
    ("Destruction de matériels ou de supports", "Destruction of equipment or supports",
     "Zerstörung von Geräten oder Datenträgern", "Vernietiging van apparatuur of media"),
    ("Défaillance de la climatisation", "Failure of air-conditioning", "Ausfall der Klimaanlage",
     "Uitval van de airconditioning"),
    ("Perte d'alimentation énergétique", "Loss of power supply", "Ausfall der Stromversorgung",
     "Verlies van stroomvoorziening"),
    ("Panne des équipements de télécommunication", "Failure of telecommunication equipment",
     "Ausfall der Telekommunikationseinrichtungen", "Uitval van telecommunicatieapparatuur"),
    ("Vol ou destruction de supports, documents ou matériels", "Theft or destruction of media, documents or equipment",
     "Diebstahl oder Zerstörung von Datenträgern, Dokumenten oder Geräten",
     "Diefstal of vernietiging van media, documenten of apparatuur"),
    ("Récupération de supports recyclés ou mis au rebut", "Retrieval of recycled or discarded media",
     "Wiederherstellung recycelter oder entsorgter Datenträger", "Terughalen van gerecyclede of afgedankte media"),
    ("Divulgation d'informations", "Disclosure of information", "Offenlegung von Informationen",
     "Openbaarmaking van informatie"),
    ("Données de sources non fiables", "Data from untrustworthy sources", "Daten aus nicht vertrauenswürdigen Quellen",
     "Gegevens uit onbetrouwbare bronnen"),
    ("Piégeage du matériel", "Tampering with hardware", "Manipulation der Hardware", "Knoeien met hardware"),
    ("Piégeage du logiciel", "Tampering with software", "Manipulation der Software", "Knoeien met software"),
    ("Panne du matériel", "Equipment failure", "Geräteausfall", "Uitval van apparatuur"),
    ("Dysfonctionnement logiciel", "Software malfunction", "Fehlfunktion der Software", "Storing van software"),
    ("Utilisation illicite du matériel", "Unauthorised use of equipment", "Unbefugte Nutzung von Geräten",
     "Ongeoorloofd gebruik van apparatuur"),
    ("Copie frauduleuse ou usage de logiciels contrefaits", "Fraudulent copying or use of counterfeit software",
     "Betrügerisches Kopieren oder Nutzung gefälschter Software", "Frauduleus kopiëren of gebruik van namaaksoftware"),
    ("Altération des données", "Corruption of data", "Verfälschung von Daten", "Beschadiging van gegevens"),
    ("Erreur d'utilisation", "Error in use", "Bedienungsfehler", "Gebruiksfout"),
    ("Abus de droit", "Abuse of rights", "Missbrauch von Rechten", "Misbruik van rechten"),
    ("Usurpation de droit", "Forging of rights", "Fälschung von Rechten", "Vervalsing van rechten"),
    ("Reniement d'actions", "Denial of actions", "Abstreiten von Handlungen", "Ontkenning van handelingen"),
    ("Atteinte à la disponibilité du personnel", "Breach of personnel availability",
     "Beeinträchtigung der Verfügbarkeit des Personals", "Aantasting van de beschikbaarheid van personeel"),
]
VULNERABILITIES = [
    ("Contrôle d'accès absent ou insuffisant", "No or insufficient access control",
     "Fehlende oder unzureichende Zugangskontrolle", "Geen of onvoldoende toegangscontrole"),
    ("Mots de passe trop faibles", "Passwords too weak", "Zu schwache Passwörter", "Te zwakke wachtwoorden"),
    ("Absence de sauvegarde des données", "No backup of data", "Keine Datensicherung", "Geen back-up van gegevens"),
    ("Logiciel non mis à jour", "Software not up to date", "Software nicht aktuell", "Software niet bijgewerkt"),
    ("Manque de sensibilisation des utilisateurs", "Lack of user awareness", "Mangelndes Bewusstsein der Benutzer",
     "Gebrek aan bewustzijn bij gebruikers"),
    ("Absence de journalisation des événements", "No logging of events", "Keine Protokollierung von Ereignissen",
     "Geen logging van gebeurtenissen"),
    ("Matériel sans contrat de maintenance", "Equipment without maintenance contract", "Geräte ohne Wartungsvertrag",
     "Apparatuur zonder onderhoudscontract"),
    ("Absence de chiffrement des données sensibles", "No encryption of sensitive data",
     "Keine Verschlüsselung sensibler Daten", "Geen versleuteling van gevoelige gegevens"),
    ("Locaux accessibles au public", "Premises open to the public", "Öffentlich zugängliche Räumlichkeiten",
     "Voor het publiek toegankelijke ruimten"),
    ("Absence de détection incendie", "No fire detection", "Keine Brandmeldeanlage", "Geen branddetectie"),
    ("Point unique de défaillance du réseau", "Single point of failure in the network",
     "Single Point of Failure im Netzwerk", "Enkelvoudig storingspunt in het netwerk"),
    ("Absence de plan de continuité", "No business continuity plan", "Kein Notfallplan",
     "Geen bedrijfscontinuïteitsplan"),
    ("Rôles et responsabilités mal définis", "Unclear roles and responsibilities",
     "Unklare Rollen und Verantwortlichkeiten", "Onduidelijke rollen en verantwoordelijkheden"),
    ("Supports amovibles non contrôlés", "Removable media not controlled", "Wechseldatenträger nicht kontrolliert",
     "Verwijderbare media niet gecontroleerd"),
    ("Absence de destruction sécurisée des supports", "No secure disposal of media",
     "Keine sichere Entsorgung von Datenträgern", "Geen veilige vernietiging van media"),
    ("Accès à distance sans authentification forte", "Remote access without strong authentication",
     "Fernzugriff ohne starke Authentifizierung", "Toegang op afstand zonder sterke authenticatie"),
    ("Dépendance à un seul fournisseur", "Dependence on a single supplier", "Abhängigkeit von einem einzigen Lieferanten",
     "Afhankelijkheid van één leverancier"),
    ("Absence de revue des droits d'accès", "No review of access rights", "Keine Überprüfung der Zugriffsrechte",
     "Geen herziening van toegangsrechten"),
]
LEVELS = ("Low risks", "Medium risks", "High risks")
NAMESPACE = uuid.UUID("6f1c2a9e-4d0b-4b8e-9a55-3c2d1e0f7a10")


def object_uuid(kind: str, labels: tuple) -> str:
    """The same uuid for the same threat or vulnerability in every analysis, as in MONARC."""
    return str(uuid.uuid5(NAMESPACE, kind + ":" + labels[1]))


def labelled(kind: str, labels: tuple) -> dict:
    return {"uuid": object_uuid(kind, labels), **{f"label{i + 1}": text for i, text in enumerate(labels)}}


class Analysis:
    """One MONARC analysis: the threats and vulnerabilities it holds and how they are rated."""

    def __init__(self, rng: random.Random, anr: str | None = None):
        self.rng = rng
        self.anr = anr or str(uuid.UUID(int=rng.getrandbits(128), version=4))
        self.threats = {object_uuid("threat", t): (t, rng.uniform(0.5, 4.5), rng.randint(1, 25), rng.randint(6, 90))
                        for t in rng.sample(THREATS, rng.randint(10, len(THREATS)))}
        self.vulnerabilities = {object_uuid("vulnerability", v): (v, rng.uniform(0.5, 4.5), rng.randint(1, 25),
                                                                  rng.randint(6, 90))
                                for v in rng.sample(VULNERABILITIES, rng.randint(8, len(VULNERABILITIES)))}
        self.risks = {kind: [rng.randint(5, 60), rng.randint(3, 40), rng.randint(0, 25)]
                      for kind in ("informational", "operational")}

    def _items(self, kind: str, objects: dict, drift: float) -> list:
        items = []
        for labels, rate, count, max_risk in objects.values():
            items.append({**labelled(kind, labels),
                          "maxRisk": max(0, round(max_risk * (1 - 0.25 * drift) + self.rng.randint(-3, 3))),
                          "count": max(1, count + self.rng.randint(-1, 1)),
                          "averageRate": f"{max(0.0, rate * (1 - 0.2 * drift) + self.rng.uniform(-0.2, 0.2)):.4f}"})
        return items

    def stats(self, day: date, drift: float) -> list[dict]:
        """The five stats MONARC's collection job sends for this analysis on `day`.

        `drift` from 0 to 1: how far the treatment went (risks fall as it grows).
        """
        rng = self.rng

        def levels(kind: str, residual: bool) -> list:
            low, medium, high = self.risks[kind]
            if residual:
                low, medium, high = low + medium // 2 + high // 3, medium // 2 + high // 3, high // 4
            shrink = 1 - (0.35 * drift if residual else 0.15 * drift)
            values = [max(0, round(v * shrink) + rng.randint(-1, 1)) for v in (low, medium, high)]
            return [{"level": level, "value": value} for level, value in zip(LEVELS, values)]

        risks = {state: {kind: levels(kind, state == "residual") for kind in ("informational", "operational")}
                 for state in ("current", "residual")}
        total = {state: {kind: sum(item["value"] for item in risks[state][kind]) for kind in risks[state]}
                 for state in risks}
        scales = {"impact": [0, 1, 2, 3, 4], "probability": [0, 1, 2, 3, 4], "likelihood": [0, 1, 2, 3, 4, 5]}
        cartography = {"scales": scales, "risks": {state: {kind: {str(i): {str(l): rng.randint(0, 4) for l in range(1, 4)}
                                                                   for i in range(1, 4)} for kind in risks[state]}
                                                   for state in risks}}
        compliance = [{"referential": "98ae2e1c-4d45-11e9-8c3a-0800277f0571", "label1": "ISO 27002",
                       "label2": "ISO 27002", "label3": "ISO 27002", "label4": "ISO 27002",
                       "current": [{"label1": "Politiques de sécurité", "label2": "Security policies",
                                    "label3": "Sicherheitsrichtlinien", "label4": "Beveiligingsbeleid",
                                    "controls": [{"code": "5.1.1", "measure": "Policies", "value": rng.randint(0, 5)}],
                                    "value": rng.randint(0, 5)}],
                       "target": []}]
        day_text = day.isoformat()
        return [
            {"anr": self.anr, "type": "risk", "date": day_text, "data": {"total": total, "risks": risks}},
            {"anr": self.anr, "type": "threat", "date": day_text,
             "data": self._items("threat", self.threats, drift)},
            {"anr": self.anr, "type": "vulnerability", "date": day_text,
             "data": self._items("vulnerability", self.vulnerabilities, drift)},
            {"anr": self.anr, "type": "cartography", "date": day_text, "data": cartography},
            {"anr": self.anr, "type": "compliance", "date": day_text, "data": compliance},
        ]


def organization_stats(seed: int, analyses: int, end: date, days: int, every: int = 7,
                       silent_for: int = 0) -> tuple[list[str], list[dict]]:
    """(the anrs, the v1 stats) of one organization: `analyses` analyses collected every
    `every` days over the `days` days up to `end` (minus the last `silent_for` days)."""
    rng = random.Random(seed)
    group = [Analysis(rng) for _ in range(analyses)]
    stats = []
    for back in range(days - 1, silent_for - 1, -every):
        day = end - timedelta(days=back)
        drift = 1 - back / max(1, days)
        for analysis in group:
            stats.extend(analysis.stats(day, drift))
    return [a.anr for a in group], stats
